"""No engine or driver touches another module's private state (issue 12: the fast path belongs to the ring).

Static check over the source (AST) of ``pyvirtio.bench``, ``pyvirtio.drivers``
and ``pyvirtio.cli``: an attribute access ``x._name`` where ``x`` is not
``self`` / ``cls`` is allowed only if ``_name`` belongs to the same module
(a class attribute, a ``__slots__`` entry or a dataclass field declared
there, or an attribute the module assigns to ``self``). So ``ring._avail16``
or ``fixed._descs`` in an engine fails, ``req._bounce`` on the module's own
request class does not. The ring package's own fast-path surface
(``shared_views``, ``take_descriptors``...) is public for the ring's sibling
modules only, and is named here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "pyvirtio"
SCANNED = sorted([*SRC.glob("bench/*.py"), *SRC.glob("drivers/**/*.py"), *SRC.glob("cli/*.py")])
#: Public names of the ring classes that only the ring package's fast paths use.
RING_INTERNAL = {
    "shared_views", "take_descriptors", "give_back_descriptors", "kick_from",
    "reserve_ids", "give_back_ids", "avail_bits", "used_bits",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_private_names(tree: ast.AST) -> set[str]:
    """Private names the module itself defines on its objects."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    own.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    for t in item.targets:
                        if isinstance(t, ast.Name):
                            own.add(t.id)
                            if t.id == "__slots__" and isinstance(item.value, ast.Tuple | ast.List):
                                own.update(e.value for e in item.value.elts if isinstance(e, ast.Constant))
                elif isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    own.add(item.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
                    own.add(t.attr)
    return {n for n in own if _private(n)}


def violations(source: str, name: str = "<test>") -> list[str]:
    """Every access to another module's private name (and the ring-internal names) in ``source``."""
    tree = ast.parse(source, name)
    own = _own_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if (_private(node.attr) and node.attr not in own) or node.attr in RING_INTERNAL:
            found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_finds_what_it_is_for() -> None:
    bad = """
class Engine:
    def run(self, ring, fixed, ordering):
        a16 = ring._avail16
        ring._kick_from = 3
        lock = ordering._fence_lock
        d = self.fixed._descs
        m = ring.shared_views()
"""
    assert [v.split(": ", 1)[1] for v in violations(bad)] == [
        "ring._avail16", "ring._kick_from", "ordering._fence_lock", "self.fixed._descs", "ring.shared_views",
    ]
    good = """
from dataclasses import dataclass
@dataclass
class Req:
    _bounce: object = None
class Driver:
    __slots__ = ("_ring",)
    def __init__(self, ring):
        self._ring = ring
        self._n = 0
    def go(self, req, other):
        req._bounce = None
        return other._n + self._ring.size
"""
    assert violations(good) == []


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_state_of_another_module(path: Path) -> None:
    assert violations(path.read_text(), path.name) == []
