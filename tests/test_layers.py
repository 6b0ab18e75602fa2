"""The package's shape, guarded: imports only point down the layers, and nothing forms a cycle.

Layers, lowest first (README, "Development"):
constants/errors → models/decode/validation/auth (credentials) → config → transport/middlewares/
retry → resources (and the batch scheduler they delegate to) → client → sync facade, webhooks,
coordination, testing → CLI and demo (they start the emulator). Config sits above auth because a
config holds the credentials object it resolved.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count. The emulator
(``voiceapi.testing``) imports nothing from the SDK: it encodes the API on its own, so a decoding
bug in the SDK cannot be mirrored by it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import voiceapi

PACKAGE_DIR = Path(voiceapi.__file__).parent

# Module (or package prefix ending in ".") → layer. A new module must be placed here.
LAYERS: dict[str, int] = {
    "voiceapi._constants": 0,
    "voiceapi._errors": 0,
    "voiceapi._aio": 0,
    "voiceapi._logs": 0,
    "voiceapi._models": 1,
    "voiceapi._decode": 1,
    "voiceapi._validation": 1,
    "voiceapi._coordinator": 1,
    "voiceapi._auth": 1,
    "voiceapi._config": 2,
    "voiceapi._transport": 3,
    "voiceapi._middlewares": 3,
    "voiceapi._retry": 3,
    "voiceapi._custom_voices": 4,
    "voiceapi._preset_voices": 4,
    "voiceapi._pages": 4,
    "voiceapi._create": 4,
    "voiceapi._batch": 4,
    "voiceapi._client": 5,
    "voiceapi._sync": 6,
    "voiceapi._sync_runner": 6,
    "voiceapi._sync_resources": 6,
    "voiceapi._sync_gen": 6,
    "voiceapi._webhooks": 6,
    "voiceapi.coordination.": 6,
    "voiceapi._demo": 7,
    "voiceapi._cli": 7,
    "voiceapi._cli.": 7,
    "voiceapi.__main__": 7,
    "voiceapi.testing.": 6,
    "voiceapi.__init__": 8,
}
# Modules split out of the batch scheduler live in its layer.
BATCH_PARTS = ("voiceapi._batch", "voiceapi._submitter", "voiceapi._tracker",
               "voiceapi._follower", "voiceapi._local_coordinator")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    return ".".join(rel.parts)


def _layer(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    if module.startswith(BATCH_PARTS):
        return LAYERS["voiceapi._batch"]
    for prefix, layer in LAYERS.items():
        if prefix.endswith(".") and module.startswith(prefix):
            return layer
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every voiceapi module this file imports at run time (lazy imports in functions too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        module = package + ".__init__" if package == "voiceapi" else package
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("voiceapi"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("voiceapi"):
                if node.module is None or target == "voiceapi":
                    # `from . import _constants as C` imports submodules by name.
                    found.update(f"{target}.{a.name}" for a in node.names)
                else:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name = _module_name(path)
        if path.name == "__init__.py":
            name = name.removesuffix(".__init__")
            name = "voiceapi.__init__" if name == "voiceapi" else name + "."
        graph[name] = _imports(path)
    return graph


def _resolve(target: str) -> str:
    """A package import means its __init__."""
    if target == "voiceapi":
        return "voiceapi.__init__"
    if (PACKAGE_DIR.parent / Path(*target.split("."))).is_dir():
        return target + "."
    return target


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _graph() if _layer(m) is None]
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS: {unplaced}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in map(_resolve, targets):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {m: {_resolve(t) for t in ts} for m, ts in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    # A package's __init__ re-exporting its own submodules is not a cycle worth reporting.
    real = [c for c in cycles if not all(m.startswith(c[0].rstrip(".")) for m in c)]
    assert not real, "import cycles: " + "; ".join(" → ".join(c) for c in real)


def test_the_emulator_imports_nothing_from_the_sdk() -> None:
    for module, targets in _graph().items():
        if module.startswith("voiceapi.testing"):
            sdk = [t for t in targets if not t.startswith("voiceapi.testing")]
            assert not sdk, f"{module} imports {sdk}"


def test_the_checker_sees_a_violation() -> None:
    """The checker itself is not vacuous: a known upward import is recognised as one."""
    assert _layer("voiceapi._errors") == 0
    assert _layer("voiceapi._client") == 5
    assert _layer("voiceapi._submitter") == _layer("voiceapi._batch")
    assert "voiceapi._custom_voices" in _graph()["voiceapi._client"]
