from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -e ".[lite0,openvino,opencv,test]"'
    assert f"{install} && cifarx train" in readme and install in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    # the report's browser test needs Chromium and onnxruntime-web: the README's way to get them is CI's
    for command in ("apt-get install -y chromium", "npm ci --prefix cifarx/web"):
        assert command in readme and command in ci, command
