"""One registry builds every model: builders are registered by name and created through `create_model`."""

from __future__ import annotations

import ast
import fnmatch
from importlib import resources
from typing import TYPE_CHECKING, Callable

from cifarx.errors import CifarxError, did_you_mean

if TYPE_CHECKING:
    import torch.nn as nn

_BUILDERS: dict[str, Callable[..., "nn.Module"]] = {}


def registrar(table: dict, kind: str):
    """`register(name)`, a decorator that files a function under `name` in `table` and refuses a second one."""

    def register(name: str):
        def decorate(function):
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            table[name] = function
            return function

        return decorate

    return register


# Decorator: register a builder `fn(num_classes=..., **kwargs) -> nn.Module` under a name.
register_model = registrar(_BUILDERS, "model")


# the built-in families: importing a module registers its builders. A new family is a module plus its name here.
BUILTIN_FAMILIES = ("fast", "simple_cnn", "vae", "blocknet", "vgg", "shake_shake", "ensemble")


def _ensure_builtin_models() -> None:
    import importlib

    for family in BUILTIN_FAMILIES:
        importlib.import_module(f"cifarx.models.{family}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_builtin_models()
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def builtin_model_names() -> list[str]:
    """The names the built-in families register, read from their source (`@register_model("name")`) instead of
    importing them: `cifarx models` and unknown-model errors answer without importing torch (seconds)."""
    names = []
    for family in BUILTIN_FAMILIES:
        source = resources.files("cifarx") / "models" / f"{family}.py"  # read, not imported: importing imports torch
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_model" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.append(node.args[0].value)
    return sorted(names)


def unknown_model_error(name: str) -> CifarxError:
    """One line naming every registered model and the timm/<name> form."""
    names = builtin_model_names()
    return CifarxError(f"unknown model {name!r}; {did_you_mean(name, names)}registered: {', '.join(names)}; or timm/<name> for "
                       "any timm model (`cifarx models --timm PATTERN` lists them)")


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
        raise unknown_model_error(name)
    try:
        return _BUILDERS[name](num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise CifarxError(f"bad arguments for model {name!r}: {error}") from None
