"""The import graph of the product packages: no cycles, no upward imports, a transport-free core.

Read from the source with ``ast`` (nothing is imported), every ``import`` counts, at module level
or inside a function: a function-level import still ties the two modules together, it only
defers the cost. Imports under ``if TYPE_CHECKING:`` are exempt: they never run.

The layers, bottom to top; a module may import its own layer and the layers below, never above:

1. ``visionroute`` (the core): records, errors, state, paths, migrations. Every folder speaks
   these types, so they depend on nothing of ours.
2. ``policies``: pure decision functions over those records (thresholds, budgets, risk control,
   the review queue and its storage). A stage calls a policy to decide; a policy never runs a
   stage, so policies sit below the stages. (The other order would need the stages to be given
   their decision rule; this one needs only the privacy redaction stage moved to cascades/ and
   the shift guard to read its own section of a calibration artefact.)
3. ``cascades``: the stages (ONNX tier, VLM client, redaction detectors) and calibration.
4. ``retrieval``: embedders (which run cascades' ONNX runner) and the index.
5. ``router`` (the transport-free core and what it is configured by): config, auth, errors,
   metrics, drift, ``router.services``.
6. ``router.http``, ``router.grpc``: the two faces, which only translate to the core.
7. ``router.app``, ``router.ingress``, ``router.tiers``, ``router.serve_runner``,
   ``router.serve_config``: the Ray Serve application and how a serve config is checked and run.
7b. ``visionroute.client``: the Python client of a running service (both faces' wire formats,
   the service's typed results); the service never calls it, the layers above may.
8. ``examples``: worked examples (the digits cascade, the tiny LLaVA and its vLLM server), built
   from the product only.
9. ``evals``: measurement; its benchmarks drive the service and the examples.
10. ``visionroute.cli``: the command line, an entry point that may import anything.

Besides the layers, ``TRANSPORT_FREE`` modules (the core, policies, cascades, retrieval, auth,
drift and the services) import no web framework, no gRPC and no Ray: they run and test without a
server, and the faces translate for them.

``SHIMS`` are the old module paths kept for one release after a move; they only re-export and
are exempt from the layer rules (never from the cycle check).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("visionroute", "policies", "cascades", "retrieval", "router", "evals", "examples")

# bottom -> top; a module's layer is that of its longest matching prefix
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("visionroute",)),
    ("policies", ("policies",)),
    ("cascades", ("cascades",)),
    ("retrieval", ("retrieval",)),
    ("router core", ("router",)),
    ("faces", ("router.http", "router.grpc")),
    ("app", ("router.app", "router.ingress", "router.tiers", "router.serve_runner", "router.serve_config")),
    ("client", ("visionroute.client",)),
    ("examples", ("examples",)),
    ("evals", ("evals",)),
    ("cli", ("visionroute.cli",)),
)
TRANSPORT_FREE = (
    "visionroute",
    "policies",
    "cascades",
    "retrieval",
    "router.auth",
    "router.drift",
    "router.services",
)
TRANSPORT = (
    "fastapi",
    "starlette",
    "grpc",
    "grpc_health",
    "ray",
    "router.http",
    "router.grpc",
    "router.serve_context",
)
NOT_TRANSPORT_FREE = ("visionroute.cli", "visionroute.client")  # under visionroute/ but on top
# old path -> where it moved; removed in the next release
SHIMS = {
    "router.grpc_ingress": "router.grpc.ingress",  # serve configs name its servicer function
    "cascades.vlm.server": "examples.vllm_server",  # `python -m cascades.vlm.server`
    "cascades.vlm.train_digits": "examples.train_digits",  # `python cascades/vlm/train_digits.py`
}


def _match(module: str, prefixes: tuple[str, ...]) -> int:
    """The length of the longest prefix of ``prefixes`` that ``module`` falls under, or -1."""
    return max((len(p) for p in prefixes if module == p or module.startswith(p + ".")), default=-1)


def layer_of(module: str) -> int:
    scores = [_match(module, prefixes) for _, prefixes in LAYERS]
    return max(range(len(LAYERS)), key=lambda i: (scores[i], i))


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if "proto" in parts:  # generated gRPC code
                continue
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for each import in ``path`` that runs, resolved to the longest
    known module: ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``. Third
    party names are kept as written (for the transport check)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                name = f"{target}.{alias.name}"
                found.append((name if name in modules else target, node.lineno))
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    resolved = []
    for name, line in found:
        parts = name.split(".")
        while len(parts) > 1 and ".".join(parts) not in modules:
            parts.pop()
        resolved.append((".".join(parts) if ".".join(parts) in modules else name, line))
    return list(dict.fromkeys(resolved))  # ``from a import b, c``: one line, one edge per module


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = product_modules()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def cycles(modules: dict[str, Path], graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    edges = {m: sorted({t for t, _ in graph[m] if t in modules and t != m}) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycles():
    modules, graph = import_graph()
    problems = []
    for component in cycles(modules, graph):
        members = set(component)
        problems.append("cycle: " + " <-> ".join(component))
        problems.extend(
            f"  {_where(modules[m], line)}: {m} imports {target}"
            for m in component
            for target, line in graph[m]
            if target in members and target != m
        )
    assert not problems, "\n".join(problems)


def test_no_upward_imports():
    modules, graph = import_graph()
    problems = [
        f"{_where(modules[m], line)}: {m} ({LAYERS[layer_of(m)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0]})"
        for m in modules
        if m not in SHIMS
        for target, line in graph[m]
        if target in modules and layer_of(target) > layer_of(m)
    ]
    assert not problems, "upward imports (see the layers in this file's docstring):\n" + "\n".join(problems)


def test_the_core_is_transport_free():
    modules, graph = import_graph()
    problems = [
        f"{_where(modules[m], line)}: {m} imports {target}"
        for m in modules
        if _match(m, TRANSPORT_FREE) >= 0 and _match(m, NOT_TRANSPORT_FREE) < 0 and m not in SHIMS
        for target, line in graph[m]
        if _match(target, TRANSPORT) >= 0
    ]
    assert not problems, "the transport-free core imports a face, a web framework or Ray:\n" + "\n".join(
        problems
    )


def test_shims_only_re_export_and_name_where_things_went():
    """A shim is small and says it goes away; every module it names exists."""
    modules, graph = import_graph()
    for shim in SHIMS:
        assert shim in modules, f"{shim} is listed in SHIMS but does not exist (drop it from SHIMS)"
        text = modules[shim].read_text()
        assert "removed in the next release" in text, f"{shim}: say when the shim goes"
        assert len(text.splitlines()) < 80, f"{shim} is a shim: it should only re-export"


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The checks above would pass vacuously if the walker missed imports: it must not."""
    source = tmp_path / "pkg" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import a.b\n"
        "from . import sibling\n"
        "from .. import top\n"
        "if TYPE_CHECKING:\n"
        "    import hidden\n"
        "def f():\n"
        "    from deep.er import thing\n"
    )
    known = {"pkg.sub.mod": source, "pkg.sub.sibling": source, "pkg.top": source, "deep.er": source}
    names = [name for name, _ in imports_of("pkg.sub.mod", source, known)]
    assert names == ["typing", "a.b", "pkg.sub.sibling", "pkg.top", "deep.er"]
    assert layer_of("visionroute.cli.serve") > layer_of("evals.harness") > layer_of("router.app")
    assert layer_of("router.http.api") > layer_of("router.services.analyze") == layer_of("router.config")
    assert layer_of("visionroute.records") < layer_of("policies.thresholds") < layer_of("cascades.onnx_stage")
