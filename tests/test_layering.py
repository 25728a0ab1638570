"""The package's layering, checked on the source with `ast` (nothing is imported):

- ``vitc.errors`` (errors.py) imports no other vitc module;
- ``passes/`` never imports ``vitc.compiler`` or ``vitc.tools``;
- ``runtimes/`` imports neither ``vitc.compiler``, ``vitc.passes`` nor ``vitc.tools``;
- ``compiler/`` never imports ``vitc.tools``;
- no module uses another vitc module's private (underscore) names: ``from vitc.x import _name`` is refused,
  ``from vitc.x import name as _alias`` is fine; ``M._name`` on a vitc module ``M`` bound by an import is refused too.

Every import counts, at the top of a file or inside a function, and so does ``importlib.import_module("vitc...")``
with a literal name. A failure lists each violation as ``FILE:LINE: the import``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `vitc`
PACKAGE = "vitc"
SCANNED = ("passes", "runtimes", "compiler", "tools")
# importer layer -> vitc sub-packages/modules it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "errors": ("vitc.compiler", "vitc.passes", "vitc.runtimes", "vitc.tools"),
    "passes": ("vitc.compiler", "vitc.tools"),
    "runtimes": ("vitc.compiler", "vitc.passes", "vitc.tools"),
    "compiler": ("vitc.tools",),
}
# inside compiler/, by stage folder: calib < quant < driver < tensorrt < measure < research < cli (the shared modules at
# compiler/'s top level, errors, progress, plots and cliargs, are the "compiler" layer above)
_C = "vitc.compiler."
FORBIDDEN |= {
    "compiler/calib": ("vitc.tools", *(_C + g for g in ("quant", "driver", "tensorrt", "measure", "research", "cli"))),
    "compiler/quant": ("vitc.tools", *(_C + g for g in ("driver", "tensorrt", "measure", "research", "cli"))),
    "compiler/driver": ("vitc.tools", *(_C + g for g in ("tensorrt", "measure", "research", "cli"))),
    "compiler/tensorrt": ("vitc.tools", *(_C + g for g in ("measure", "research", "cli"))),
    "compiler/measure": ("vitc.tools", *(_C + g for g in ("research", "cli"))),
    "compiler/research": ("vitc.tools", _C + "cli"),
    "compiler/cli": ("vitc.tools",),
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}  ({self.why})"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def is_vitc(mod: str) -> bool:
    return mod == PACKAGE or mod.startswith(PACKAGE + ".")


def is_module(mod: str, root: Path = ROOT) -> bool:
    """``mod`` (``vitc.a.b``) is a module or package of this repository."""
    if not is_vitc(mod):
        return False
    p = root.joinpath(*mod.split(".")[1:])
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer_of(rel: Path) -> str | None:
    if len(rel.parts) == 1:
        return "errors" if rel.name == "errors.py" else None
    if rel.parts[0] == "compiler" and len(rel.parts) > 2:
        return f"compiler/{rel.parts[1]}"
    return rel.parts[0]


def within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def resolve_from(node: ast.ImportFrom, importer: str, is_pkg: bool) -> str:
    """The absolute module of ``from ... import``, relative imports included."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def check_source(text: str, rel: Path, root: Path = ROOT) -> list[Violation]:
    """The layering and private-name violations of one file (``rel``: its path from the repository root)."""
    tree = ast.parse(text, filename=str(rel))
    lines = text.splitlines()
    me = module_name(rel)
    is_pkg = rel.name == "__init__.py"
    layer = layer_of(rel)
    forbidden = FORBIDDEN.get(layer or "", ())
    out: list[Violation] = []
    modules_bound: dict[str, str] = {}  # local name -> vitc module it is bound to

    def src(node: ast.AST) -> str:
        first = lines[node.lineno - 1].strip()
        end = getattr(node, "end_lineno", node.lineno)
        return first if end == node.lineno else first + " ..."

    def layer_check(node: ast.AST, targets: list[str]) -> None:
        for t in targets:
            bad = next((f for f in forbidden if within(t, f)), None)
            if bad is not None:
                out.append(Violation(str(rel), node.lineno, src(node), f"{layer}/ must not import {bad}"))
                return

    def private_module_check(node: ast.AST, mod: str) -> None:
        priv = [p for p in mod.split(".")[1:] if is_private(p)]
        if priv and mod != me and not within(me, mod):
            out.append(Violation(str(rel), node.lineno, src(node), f"private module {mod}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not is_vitc(a.name):
                    continue
                layer_check(node, [a.name])
                private_module_check(node, a.name)
                if a.asname:
                    modules_bound[a.asname] = a.name
                else:
                    modules_bound[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            mod = resolve_from(node, me, is_pkg)
            if not is_vitc(mod):
                continue
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}", root)]
            layer_check(node, targets)
            private_module_check(node, mod)
            for a in node.names:
                if is_private(a.name) and mod != me:
                    out.append(Violation(str(rel), node.lineno, src(node), f"private name {a.name!r} of {mod}"))
                if is_module(f"{mod}.{a.name}", root):
                    modules_bound[a.asname or a.name] = f"{mod}.{a.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and is_vitc(node.args[0].value)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            layer_check(node, [node.args[0].value])
            private_module_check(node, node.args[0].value)

    # M._name where M is a vitc module bound by an import (also vitc.a.b._name after `import vitc.a.b`)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        chain, v = [], node.value
        while isinstance(v, ast.Attribute):
            chain.append(v.attr)
            v = v.value
        if not isinstance(v, ast.Name) or v.id not in modules_bound:
            continue
        mod = ".".join([modules_bound[v.id], *reversed(chain)])
        if is_module(mod, root) and mod != me:
            out.append(Violation(str(rel), node.lineno, src(node), f"private name {node.attr!r} of {mod}"))
    return sorted(out, key=lambda v: v.line)


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    files += sorted(p for p in ROOT.glob("*.py"))
    return [p for p in files if ".venv" not in p.parts]


def all_violations() -> list[Violation]:
    out = []
    for p in scanned_files():
        out += check_source(p.read_text(encoding="utf-8"), p.relative_to(ROOT))
    return out


def report(vs: list[Violation]) -> str:
    return "\n".join(str(v) for v in vs)


# -- the repository ---------------------------------------------------------------------------------------------------
def test_scans_every_layer():
    found = {p.relative_to(ROOT).parts[0] for p in scanned_files()}
    assert set(SCANNED) <= found and (ROOT / "errors.py").is_file()


def test_layers_import_only_downwards():
    vs = [v for v in all_violations() if "must not import" in v.why]
    assert not vs, "layering violations:\n" + report(vs)


def test_no_module_uses_another_modules_private_names():
    vs = [v for v in all_violations() if "private" in v.why]
    assert not vs, "private-name imports across modules:\n" + report(vs)


# -- the checker itself -----------------------------------------------------------------------------------------------
def test_checker_catches_top_level_local_and_dynamic_imports():
    text = ("import numpy as np\n"
            "from vitc.compiler.errors import VitcError\n"
            "from vitc.errors import PassError\n"
            "def f():\n"
            "    import vitc.tools.tiny_models\n"
            "    from vitc import compiler\n"
            "    from ..compiler import policy\n"
            "    return importlib.import_module('vitc.compiler.cli.main')\n")
    vs = check_source(text, Path("passes/x.py"))
    assert [v.line for v in vs] == [2, 5, 6, 7, 8], report(vs)
    assert str(vs[0]) == ("passes/x.py:2: from vitc.compiler.errors import VitcError  "
                          "(passes/ must not import vitc.compiler)")
    rt = check_source("def g():\n    from vitc.passes.trt_fp16 import to_fp16\n", Path("runtimes/y.py"))
    assert [(v.line, v.why) for v in rt] == [(2, "runtimes/ must not import vitc.passes")]
    assert check_source("from vitc.passes.base import PassResult\n", Path("compiler/z.py")) == []
    assert [v.line for v in check_source("from vitc.tools import tiny_models\n", Path("compiler/z.py"))] == [1]
    assert [v.line for v in check_source("from vitc.passes import base\n", Path("errors.py"))] == [1]


def test_checker_catches_private_names():
    text = ("from vitc.compiler.measure.bench import _pos_int\n"
            "from vitc.compiler.measure.bench import pos_int as _pos\n"  # a public name under a private alias: fine
            "from vitc.compiler.measure import bench as B\n"
            "import vitc.compiler.driver.build\n"
            "from vitc import __version__\n"  # dunder: fine
            "def f():\n"
            "    from vitc.compiler.driver.build import _versions as versions\n"
            "    return B._pos_float, vitc.compiler.driver.build._roles, B.pos_int\n")
    vs = check_source(text, Path("tools/t.py"))
    assert [(v.line, v.why) for v in vs] == [
        (1, "private name '_pos_int' of vitc.compiler.measure.bench"),
        (7, "private name '_versions' of vitc.compiler.driver.build"),
        (8, "private name '_pos_float' of vitc.compiler.measure.bench"),
        (8, "private name '_roles' of vitc.compiler.driver.build"),
    ], report(vs)
    # a module's own private names are its business
    assert check_source("from vitc.compiler.measure.bench import _pos_int\n", Path("compiler/measure/bench.py")) == []
