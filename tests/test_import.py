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


# What is built on the core; the core never reaches it. Everything else under gradscope/
# (the recorder and its statistics, the analysis, the run folder, files) is core.
UPPER = (
    "gradscope.lab",
    "gradscope.report",
    "gradscope.plot",
    "gradscope.cli",
    "gradscope.integrations",
    "gradscope.remedies",
)
# Call-time facades: a core object's convenience that reaches up only when it is called (an
# import inside the method), so that importing the core loads no plotting. Each is named.
ALLOWED = {
    # rec.save() writes the run folder with its report
    ("gradscope.recorder.results", "gradscope.report.run"),
    # _repr_html_: what Jupyter shows for a Recorder, a Run and a list of verdicts
    ("gradscope.recorder.results", "gradscope.integrations.notebook"),
    ("gradscope.runs", "gradscope.integrations.notebook"),
    ("gradscope.verdict", "gradscope.integrations.notebook"),
    # gs.watch(model, live=True) draws the live view
    ("gradscope.recorder.recorder", "gradscope.integrations.live"),
    # what Jupyter shows for a sweep's results (the lab, not the core: for the cycle check)
    ("gradscope.lab.sweep.result", "gradscope.integrations.notebook"),
}


def _modules():
    """Every module of the package: dotted name -> path."""
    from pathlib import Path

    import gradscope

    root = Path(gradscope.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _edges(modules, top_level=False):
    """Each module's imports of other gradscope modules (at load or inside functions; with
    `top_level`, only the module's own statements), the name resolved to the module that
    defines it; a package's own parents are left out."""
    import ast

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges = {}
    for name, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level else ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in map(resolve, (f for f in found if f.startswith("gradscope"))):
                if target and target != name and not name.startswith(target + "."):
                    targets.add(target)
        edges[name] = targets
    return edges


def test_the_core_reaches_nothing_built_on_it():
    modules = _modules()
    edges = _edges(modules)
    core = [m for m in modules if m != "gradscope" and m != "gradscope.__main__"]
    core = [m for m in core if not m.startswith(UPPER)]
    assert {"gradscope.recorder.recorder", "gradscope.runs", "gradscope.schema"} <= set(core)
    bad = [
        (m, t)
        for m in core
        for t in sorted(edges[m])
        if t.startswith(UPPER) and (m, t) not in ALLOWED
    ]
    assert not bad, f"core modules import what is built on them: {bad}"
    for module, target in ALLOWED:
        assert target not in _edges(modules, top_level=True)[module], (module, target)


def test_no_import_cycle():
    """No cycle once the call-time facades (ALLOWED) are set aside."""
    edges = {m: t - {b for a, b in ALLOWED if a == m} for m, t in _edges(_modules()).items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
