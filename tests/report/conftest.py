"""Fixtures of the report tests: two tiny exports with a card, stand-in onnxruntime-web files, and the browser check."""

import os
from pathlib import Path

import pytest

from cifarx.report.site import DEFAULT_ORT_WEB, ORT_WEB_FILES


@pytest.fixture(scope="session")
def exports(trained_run, tmp_path_factory) -> Path:
    """Two tiny exports of one run (plain, and with flip TTA in the graph), the first with its model card."""
    from cifarx.deploy.card import write_model_card
    from cifarx.deploy.export import export_onnx

    folder = tmp_path_factory.mktemp("exports")
    report = export_onnx(trained_run["run"], folder / "tiny.onnx", parity_count=16)
    # written from the run's parent folder, as from a repository holding runs/: the card names the run relative to it
    # (a card never records this machine's absolute paths), and the report, run from there, finds its curves
    here = os.getcwd()
    os.chdir(trained_run["run"].parent)
    try:
        write_model_card(trained_run["run"], folder / "tiny.onnx", report, [], "cifarx export run -o tiny.onnx --card")
    finally:
        os.chdir(here)
    export_onnx(trained_run["run"], folder / "tiny-flip.onnx", tta="flip", parity_count=16)
    return folder


@pytest.fixture
def ort_web(tmp_path) -> Path:
    """Stand-ins for onnxruntime-web's files, for the tests that never open a browser."""
    folder = tmp_path / "ort-web"
    folder.mkdir()
    for name in ORT_WEB_FILES:
        (folder / name).write_text("// stand-in")
    return folder


@pytest.fixture
def browser():
    """Chromium, Playwright and the npm-installed onnxruntime-web; CI (CIFARX_REQUIRE_BROWSER=1) fails without them."""
    from cifarx.report.browser import find_chromium

    missing = []
    if find_chromium() is None:
        missing.append("chromium (apt-get install -y chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if not all((DEFAULT_ORT_WEB / name).is_file() for name in ORT_WEB_FILES):
        missing.append("onnxruntime-web (npm ci --prefix cifarx/report/web)")
    if missing and os.environ.get("CIFARX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test needs {', '.join(missing)}")
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)}")
