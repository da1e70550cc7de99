"""The layer rules of docs/architecture.md, enforced on the source tree.

Every module of ``pyvirtio`` belongs to a layer; a module may import from its
own layer and the layers below it, never from a layer above (lazy imports
inside functions count too: they are still dependencies). A new subpackage or
top-level module must be placed in :data:`LAYERS` deliberately, so this test
fails until it is.

It also enforces the privacy rule: no module imports a private name
(``_name``) from another module, and no module outside a package imports that
package's private modules (``pyvirtio.drivers._checks`` is for ``drivers/``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "pyvirtio"

#: Layer numbers, low to high (docs/architecture.md, "Layers"). Keys are the
#: first component below ``pyvirtio`` (a subpackage or a top-level module).
LAYERS: dict[str, int] = {
    "errors": 0,
    "spec": 0,
    "memory": 1,
    "ring": 2,
    "protocol": 2,
    "transport": 3,
    "backends": 3,
    "testing": 3,
    "trace": 3,  # a proxy: protocol decoding plus its own sockets
    "conformance": 3,  # a raw frontend that breaks rules on purpose (testing.hostile, trace)
    "device": 4,
    "targets": 4,
    "drivers": 5,
    "bench": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 7,  # the package's public re-exports
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every pyvirtio import in ``path``, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "pyvirtio":
                found.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pyvirtio":
                    found.append((node.lineno, alias.name, []))
    return found


MODULES = sorted(p for p in SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({_layer_key(_module_name(p)) for p in MODULES} - set(LAYERS))
    assert not unplaced, f"place these in tests/test_layers.py LAYERS and docs/architecture.md: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_from_a_layer_above(path: Path) -> None:
    me = _module_name(path)
    mine = LAYERS[_layer_key(me)]
    upward = []
    for line, module, names in _imports(path):
        targets = [module] if module != "pyvirtio" else [f"pyvirtio.{n}" for n in names]
        for target in targets:
            key = _layer_key(target)
            if key in LAYERS and LAYERS[key] > mine:
                upward.append(f"line {line}: {me} (layer {mine}) imports {target} (layer {LAYERS[key]})")
    assert not upward, "\n".join(upward)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_names_from_other_modules(path: Path) -> None:
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    bad = []
    for line, module, names in _imports(path):
        dotted = [module] + [f"{module}.{n}" for n in names if _is_module(f"{module}.{n}")]
        for target in dotted:  # a private module is for its own package
            parts = target.split(".")
            for i, part in enumerate(parts):
                owner = ".".join(parts[:i])
                if _private(part) and not (package == owner or package.startswith(owner + ".")):
                    bad.append(f"line {line}: imports the private module {'.'.join(parts[: i + 1])}")
        for n in names:  # a private name is for its own module
            if _private(n) and not _is_module(f"{module}.{n}") and module != me:
                bad.append(f"line {line}: imports the private name {n} from {module}")
    assert not bad, f"{me}:\n" + "\n".join(bad)
