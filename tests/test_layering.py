"""The package's layering, read from the source: the core (attrib/) never imports the path graphs or the
figures, graphs/ never imports viz/, only the CLI composes them, no oracle is imported outside tests and
benchmarks, and graphs/ and viz/ install as attrib.graphs and attrib.viz (no generic top-level names)."""
import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def sources(folder: str, package: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        yield path, ".".join([package, *parts[:-1]] if parts[-1] == "__init__" else [package, *parts[:-1]])


def offends(names: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == b or n.startswith(b + ".") for b in banned))


def test_the_core_never_imports_graphs_or_viz_and_graphs_never_imports_viz():
    found = {}
    for path, package in sources("attrib", "attrib"):
        if path.name in ("cli.py", "cli_text.py", "cli_run.py"):
            continue  # the command line composes all three (cli_text.py: its text-model runs; cli_run.py: dataset runs)
        bad = offends(imported(path, package), ("attrib.graphs", "attrib.viz", "graphs", "viz"))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    for path, package in sources("graphs", "attrib.graphs"):
        bad = offends(imported(path, package), ("attrib.viz", "viz"))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    for folder, package in (("attrib", "attrib"), ("graphs", "attrib.graphs"), ("viz", "attrib.viz")):
        for path, pkg in sources(folder, package):
            bad = offends(imported(path, pkg), ("captum", "zennit"))
            if bad:
                found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_graphs_and_viz_install_under_attrib():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(name == "attrib" or name.startswith("attrib.") for name in config["packages"])
    assert config["package-dir"]["attrib.graphs"] == "graphs" and config["package-dir"]["attrib.viz"] == "viz"
    import attrib.graphs
    import attrib.viz

    assert Path(attrib.graphs.__file__).parent == ROOT / "graphs" and Path(attrib.viz.__file__).parent == ROOT / "viz"


def module_graph() -> dict[str, set[str]]:
    """Every module of the package (as installed) -> the package modules it imports, at any level
    (module top, inside functions, under TYPE_CHECKING): an import hidden in a function is still an edge."""
    modules = {}
    for folder, package in (("attrib", "attrib"), ("graphs", "attrib.graphs"), ("viz", "attrib.viz")):
        for path, pkg in sources(folder, package):
            name = pkg if path.name == "__init__.py" else f"{pkg}.{path.stem}"
            modules[name] = (path, pkg)
    return {
        name: {target for target in imported(path, pkg) if target in modules and target != name}
        for name, (path, pkg) in modules.items()
    }


def test_no_import_cycle():
    """Run alone: ``python -m pytest tests/test_layering.py -k cycle``."""
    graph = module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
    assert graph["attrib.lrp.trace"] >= {"attrib.lrp.run", "attrib.lrp.plan"}  # the graph is read, not empty
