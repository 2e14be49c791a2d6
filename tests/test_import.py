import subprocess
import sys


def test_import_loads_no_cli_or_plotting():
    code = (
        "import sys, gradscope, gradscope.sweep;"
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
