"""The shape of the code: stages import only downwards, no module imports itself back round a circle, the command
line is only the command line, and no file grows past what one reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

from serving.instance import REPO

# The stages, lowest first: a module may import its own stage or a lower one, never a higher one.
STAGES = [
    {"handlers"},  # what runs inside a worker
    {"archives"},  # specs and the model store
    {"export", "build_mar"},  # the build: weights to a checked archive, and bringing a model in
    {"serving"},  # what runs in production: the instance, the client, the front door, health, v2
    {"manage", "monitoring", "load_test"},  # the command line, Prometheus, measurement
    {"deploy"},  # beyond one machine
]
STAGE = {package: rank for rank, packages in enumerate(STAGES) for package in packages}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {"build_mar": REPO / "build_mar.py"}
    for package in STAGE.keys() - {"build_mar"}:
        for path in (REPO / package).rglob("*.py"):
            if "peer_apps" in path.parts:  # the peers' own apps, run by their servers, not imported
                continue
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules ``path`` imports (at any depth of the file: a lazy import is still an arrow)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    resolved = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            resolved.add(name)
    return resolved


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_no_module_imports_itself_back_round_a_circle():
    edges, state, circles = graph(), {}, []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [name, target])
            elif target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    assert circles == [], [" → ".join(dict.fromkeys(circle)) for circle in circles]


def test_every_arrow_points_to_the_same_stage_or_a_lower_one():
    def stage(name: str) -> int:
        return STAGE[name.split(".")[0]]

    upward = sorted(f"{name} → {target}" for name, targets in graph().items() for target in targets
                    if stage(target) > stage(name))
    assert upward == []


def test_manage_is_only_the_command_line():
    assert sorted(p.name for p in (REPO / "manage").glob("*.py")) == ["__init__.py", "__main__.py"]


def test_no_file_outside_the_tests_is_longer_than_one_reader_takes_in():
    long = {str(path.relative_to(REPO)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_the_checker_finds_a_circle_and_an_upward_arrow(tmp_path):
    """The graph is read from the source: an upward import written into a copy is seen."""
    module = tmp_path / "probe.py"
    module.write_text("from deploy.render import render_all\nimport serving.instance\n")
    assert imports(module, set(modules())) == {"deploy.render", "serving.instance"}
