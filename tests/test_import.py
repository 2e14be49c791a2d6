import subprocess
import sys


def test_import_loads_no_cli_or_plotting():
    code = (
        "import sys, gradscope, gradscope.lab.sweep;"
        "bad = [m for m in ('typer', 'seaborn', 'matplotlib', 'rich') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_exactly_all():
    import types

    import gradscope

    public = {
        name
        for name, value in vars(gradscope).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(gradscope.__all__)
    assert {"watch", "Recorder", "diagnose", "build_model", "load_dataset"} <= public


CORE = [
    "schema", "files", "frame", "diagnose", "recorder", "recorder/stats", "recorder/stats/native",
]  # fmt: skip
LAB = ("gradscope.lab", "gradscope.report", "gradscope.cli")


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_core_imports_nothing_from_the_lab_report_or_cli():
    from pathlib import Path

    import gradscope

    root = Path(gradscope.__file__).parent
    files = []
    for name in CORE:
        package = root / name
        files += sorted(package.glob("*.py")) if package.is_dir() else [root / f"{name}.py"]
    assert len(files) > len(CORE)  # the recorder package's files are among them
    for path in files:
        bad = [m for m in _imports(path) if m.startswith(LAB)]
        assert not bad, f"{path.relative_to(root)} imports {bad}"
