from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -e ".[lite0,lite2,openvino,opencv,ncnn,mnn,iree,litert,test]"'
    assert f"{install} && cifarx train" in readme and install in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    # the report's browser test needs Chromium and onnxruntime-web: the README's way to get them is CI's
    for command in ("apt-get install -y chromium", "npm ci --prefix cifarx/report/web"):
        assert command in readme and command in ci, command


# Standard-library modules younger than the oldest Python anyone might claim, with the version that added them.
NEWER_STDLIB = {"tomllib": (3, 11)}


def test_the_python_version_readme_and_pyproject_claim_can_import_cifarx():
    import ast
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    major, minor = map(int, re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups())
    imported = set()
    for path in (ROOT / "cifarx").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    for module, version in NEWER_STDLIB.items():
        if module in imported:
            assert (major, minor) >= version, f"cifarx imports {module} (Python {version}), pyproject claims {major}.{minor}"
    assert f"Python ≥ {major}.{minor}" in (ROOT / "README.md").read_text()


def readme_cifarx_commands() -> list[list[str]]:
    """Every `cifarx ...` command of README.md's bash blocks, as words (continuation lines joined, comments cut)."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if words[:1] == ["cifarx"]:
                    commands.append(words[1:])
    return commands


def test_every_cifarx_command_in_the_readme_parses():
    """Each README command's options and values are what the CLI accepts (parsed, not run)."""
    from cifarx.cli.main import cli

    commands = readme_cifarx_commands()
    assert len(commands) >= 20
    for words in commands:
        context = cli.make_context("cifarx", list(words), resilient_parsing=False)
        name, command, rest = cli.resolve_command(context, list(words))
        command.make_context(name, rest, parent=context)  # raises on an unknown option or a bad value
