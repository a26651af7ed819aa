"""The shape of the house (issue 10), read from the sources with `ast`: the library's subpackages
import each other without a cycle, evaluation never imports the trainer, `kernels/` never imports
the library, and the accelerator is probed in at most two library modules."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every absolute import of the file, lazy ones inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])  # fgclip_mega.<subpackage or module>


def _library_graph() -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for path in (ROOT / "fgclip_mega").rglob("*.py"):
        src = _unit(_module(path))
        graph[src]
        for name in _imports(path):
            if (
                name.startswith("fgclip_mega.")
                and (ROOT / name.replace(".", "/")).exists()
                or (ROOT / (name.replace(".", "/") + ".py")).exists()
            ):
                dst = _unit(name)
                if dst != src and dst.startswith("fgclip_mega."):
                    graph[src].add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_subpackages_form_no_import_cycle():
    graph = _library_graph()
    assert {"fgclip_mega.models", "fgclip_mega.train", "fgclip_mega.objective"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layering():
    graph = _library_graph()
    assert "fgclip_mega.train" not in graph["fgclip_mega.eval"]
    assert graph["fgclip_mega.config"] == set()  # config is a leaf
    # Models know no data source and compute no loss.
    assert not graph["fgclip_mega.models"] & {
        "fgclip_mega.data", "fgclip_mega.losses", "fgclip_mega.objective", "fgclip_mega.train",
    }  # fmt: skip
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not any(n.startswith("fgclip_mega") for n in _imports(path)), path


def test_the_accelerator_is_probed_in_at_most_two_library_modules():
    probing = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "fgclip_mega").rglob("*.py")
        if "torch.cuda.is_available()" in p.read_text()
    ]
    assert len(probing) <= 2, probing
