"""One registry builds every model: builders are registered by name and created through `create_model`."""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from cifarx.errors import CifarxError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a builder `fn(num_classes=..., **kwargs) -> nn.Module` under `name`."""

    def decorate(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def _ensure_builtin_models() -> None:
    import cifarx.models  # noqa: F401  (importing registers the built-in families)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_builtin_models()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model (or `timm/<name>`) taking [B,3,32,32] floats in [0,1] and returning logits."""
    _ensure_builtin_models()
    if name.startswith("timm/"):
        from cifarx.models.transfer import create_timm_classifier

        try:
            return create_timm_classifier(name.removeprefix("timm/"), num_classes=num_classes, **kwargs)
        except TypeError as error:
            raise CifarxError(f"bad arguments for model {name!r}: {error}") from None
    if name not in _BUILDERS:
        raise CifarxError(f"unknown model {name!r}; `cifarx models` lists the registered ones")
    try:
        return _BUILDERS[name](num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise CifarxError(f"bad arguments for model {name!r}: {error}") from None
