"""Which packages may import which (DESIGN.md, "The four roles"), checked on every .py file of the tree.

a. kvmesh/ imports no role package (gateway, prefill_service, decode_service, cache_store), except
   kvmesh/cli/, which starts roles (`kvmesh serve ROLE`).
b. A role package imports no other role package: roles talk over gRPC.
c. kvmesh/ and the roles import no `training` (training code stays out of the runtime), and nothing
   outside tests/ and bench/ imports bench, scripts or tests.
d. kvmesh/engine/ knows nothing of gRPC: it imports no grpc*, kvmesh.v1, kvmesh.client, kvmesh.mesh,
   kvmesh.transport or kvmesh.cli.
e. The cache store process never imports torch (a subprocess takes the path `kvmesh serve cache-store` takes).

Rules a-d read imports with `ast`: at module top, inside functions, under `if TYPE_CHECKING:`, relative or
absolute, and `importlib.import_module("a.literal")`. `from X import a` counts as importing X and X.a.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("gateway", "prefill_service", "decode_service", "cache_store")
DEV_ONLY = ("bench", "scripts", "tests")
ENGINE_FORBIDDEN = (
    *("grpc", "grpc_health", "grpc_reflection", "grpc_status"),
    *("kvmesh.v1", "kvmesh.client", "kvmesh.mesh", "kvmesh.transport", "kvmesh.cli"),
)
SKIPPED_DIRS = ("build", "dist", "node_modules", "__pycache__")


@dataclass(frozen=True)
class Import:
    module: str
    """Absolute dotted name, e.g. "cache_store.server"."""
    line: int


@dataclass(frozen=True)
class Violation:
    path: str
    """Relative to the repository root, with forward slashes."""
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: rule {self.rule}: {self.message}"


def module_name(path: str) -> str:
    """kvmesh/engine/model.py -> kvmesh.engine.model; kvmesh/engine/__init__.py -> kvmesh.engine."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def imports_of(source: str, path: str) -> list[Import]:
    """Every module the source at path imports, wherever the import statement sits."""
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..mesh import x` in kvmesh/engine/a.py is kvmesh.mesh
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.append(Import(base, node.lineno))
            found += [
                Import(f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"
            ]
        elif isinstance(node, ast.Call) and _dynamic_import_name(node) is not None:
            found.append(Import(_dynamic_import_name(node) or "", node.lineno))
    return found


def _dynamic_import_name(call: ast.Call) -> str | None:
    """The literal module of `importlib.import_module("x")` or `__import__("x")`; None for anything else."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def _within(module: str, packages: Sequence[str]) -> str | None:
    """The first of packages that module is or lies inside."""
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def _top(path: str) -> str:
    return path.split("/", 1)[0]


def check_core_imports_no_role(path: str, imports: Sequence[Import]) -> list[Violation]:
    """Rule a."""
    if _top(path) != "kvmesh" or path.startswith("kvmesh/cli/"):
        return []
    return [
        Violation(
            path, i.line, "a", f"the core imports role package {role} ({i.module}); only kvmesh/cli/ may"
        )
        for i in imports
        if (role := _within(i.module, ROLES))
    ]


def check_roles_import_no_role(path: str, imports: Sequence[Import]) -> list[Violation]:
    """Rule b."""
    own = _top(path)
    if own not in ROLES:
        return []
    others = [r for r in ROLES if r != own]
    return [
        Violation(path, i.line, "b", f"role {own} imports role {role} ({i.module}); roles talk over gRPC")
        for i in imports
        if (role := _within(i.module, others))
    ]


def check_no_training_or_dev_code(path: str, imports: Sequence[Import]) -> list[Violation]:
    """Rule c."""
    found = []
    for i in imports:
        if _top(path) in ("kvmesh", *ROLES) and _within(i.module, ["training"]):
            found.append(Violation(path, i.line, "c", f"runtime code imports training ({i.module})"))
        if _top(path) not in ("tests", "bench") and (dev := _within(i.module, DEV_ONLY)):
            found.append(
                Violation(path, i.line, "c", f"imports {dev} ({i.module}); only tests/ and bench/ may")
            )
    return found


def check_engine_knows_no_grpc(path: str, imports: Sequence[Import]) -> list[Violation]:
    """Rule d."""
    if not path.startswith("kvmesh/engine/"):
        return []
    return [
        Violation(path, i.line, "d", f"the engine imports {package} ({i.module}); it knows nothing of gRPC")
        for i in imports
        if (package := _within(i.module, ENGINE_FORBIDDEN))
    ]


CHECKERS: dict[str, Callable[[str, Sequence[Import]], list[Violation]]] = {
    "a": check_core_imports_no_role,
    "b": check_roles_import_no_role,
    "c": check_no_training_or_dev_code,
    "d": check_engine_knows_no_grpc,
}


def check_source(path: str, source: str, rules: str = "abcd") -> list[Violation]:
    """Rules' violations in one file, one per import statement and rule."""
    imports = imports_of(source, path)
    found = [v for rule in rules for v in CHECKERS[rule](path, imports)]
    first: dict[tuple[int, str], Violation] = {}
    for violation in found:  # `from X import a` names X first: keep that one
        first.setdefault((violation.line, violation.rule), violation)
    return list(first.values())


def python_files(root: Path = ROOT) -> Iterator[str]:
    for file in sorted(root.rglob("*.py")):
        parts = file.relative_to(root).parts
        if not any(p.startswith(".") or p.endswith(".egg-info") or p in SKIPPED_DIRS for p in parts[:-1]):
            yield "/".join(parts)


@functools.cache
def tree_violations() -> tuple[Violation, ...]:
    return tuple(v for p in python_files() for v in check_source(p, (ROOT / p).read_text(encoding="utf-8")))


# Rule e. The modules `python -m kvmesh.cli serve cache-store` imports before it serves (kvmesh.cli.main,
# then in _serve kvmesh.cli.launcher and role_settings, which imports cache_store.server), then the server.
CACHE_STORE_PROCESS = """
from kvmesh.cli.main import build_parser
from kvmesh.cli.settings import role_settings
import kvmesh.cli.launcher
role_settings("cache-store", build_parser().parse_args(["serve", "cache-store", "--port", "0"]))
import cache_store.server
"""


def torch_import_chain(code: str, roots: Sequence[Path] = (ROOT,)) -> list[str] | None:
    """None when running code leaves torch out of sys.modules; else the import chain that brought it in,
    outermost first (from `python -X importtime`), ending in torch."""
    check = f"{code}\nimport sys\nprint('torch' in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, roots))}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", check],
        cwd=roots[0],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.split()[-1] == "False":
        return None
    # Each line is "import time: self | cumulative | <2 spaces per level>name", a module after its children.
    rows = [
        line.rsplit("|", 1)[1][1:] for line in result.stderr.splitlines() if line.startswith("import time:")
    ]
    levels = [(len(row) - len(row.lstrip())) // 2 for row in rows]
    start = next((n for n, row in enumerate(rows) if row.strip() == "torch"), None)
    if start is None:  # in sys.modules without an import of its own (put there by hand): no chain to show
        return ["torch"]
    chain, level = ["torch"], levels[start]
    for row, row_level in zip(rows[start:], levels[start:], strict=True):
        if row_level < level:
            chain.insert(0, row.strip())
            level = row_level
    return chain


def describe_chain(chain: Sequence[str], roots: Sequence[Path] = (ROOT,)) -> str:
    """Where each module of the chain imports the next: "a.py:3 -> b/c.py:7 -> torch"."""
    steps = []
    for importer, imported in zip(chain, chain[1:], strict=False):
        path = next((f for f in _source_paths(importer, roots) if f[0].is_file()), None)
        if path is None:
            steps.append(importer)
            continue
        imports = imports_of(path[0].read_text(encoding="utf-8"), path[1])
        exact = [i.line for i in imports if i.module == imported]
        lines = exact or [i.line for i in imports if imported.startswith(i.module + ".")]
        steps.append(f"{path[1]}:{min(lines)}" if lines else path[1])
    return " -> ".join([*steps, chain[-1]])


def _source_paths(module: str, roots: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    relative = module.replace(".", "/")
    for root in roots:
        yield root / f"{relative}.py", f"{relative}.py"
        yield root / relative / "__init__.py", f"{relative}/__init__.py"


def check_cache_store_without_torch(code: str, roots: Sequence[Path] = (ROOT,)) -> list[Violation]:
    """Rule e; the violation sits where the first project module of the chain imports the next."""
    chain = torch_import_chain(code, roots)
    if chain is None:
        return []
    where = describe_chain(chain, roots)
    path, _, line = where.split(" -> ")[0].partition(":")
    message = f"the cache store process imports torch: {where}"
    return [Violation(path, int(line) if line else 0, "e", message)]


# The checkers can fail: one violating source per rule.


def test_rule_a_flags_the_core_importing_a_role_even_inside_a_function():
    source = "import os\n\ndef serve():\n    from cache_store.server import serve\n"
    [violation] = check_source("kvmesh/mesh/registration.py", source)
    assert (violation.line, violation.rule) == (4, "a")
    assert "cache_store" in str(violation) and "kvmesh/mesh/registration.py:4" in str(violation)


def test_rule_b_flags_a_role_importing_another_under_type_checking():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import decode_service.config\n"
    [violation] = check_source("gateway/router.py", source)
    assert (violation.path, violation.line, violation.rule) == ("gateway/router.py", 3, "b")


def test_rule_c_flags_training_in_the_runtime_and_dev_code_outside_tests_and_bench():
    assert [
        (v.line, v.rule) for v in check_source("decode_service/x.py", "from training import train\n")
    ] == [(1, "c")]
    source = "import importlib\nhelpers = importlib.import_module('tests.factories')\n"
    assert [(v.line, v.rule) for v in check_source("training/train.py", source)] == [(2, "c")]
    assert [(v.line, v.rule) for v in check_source("scripts/x.py", "from bench import mesh\n")] == [(1, "c")]


def test_rule_d_flags_the_engine_importing_grpc_or_the_mesh_even_relatively():
    source = "import grpc.aio\nfrom ..mesh import workers\nfrom .. import transport\n"
    violations = check_source("kvmesh/engine/engine.py", source)
    assert [(v.line, v.rule) for v in violations] == [(1, "d"), (2, "d"), (3, "d")]
    assert "kvmesh.mesh" in violations[1].message and "kvmesh.transport" in violations[2].message


def test_rule_e_flags_a_cache_store_path_that_imports_torch(tmp_path):
    (tmp_path / "torch.py").write_text("")  # a stand-in: the real torch takes seconds to import
    (tmp_path / "fake_store").mkdir()
    (tmp_path / "fake_store" / "__init__.py").write_text("")
    (tmp_path / "fake_store" / "server.py").write_text("import json\n\nfrom fake_store import model\n")
    (tmp_path / "fake_store" / "model.py").write_text('"""A model."""\n\nimport torch\n')
    [violation] = check_cache_store_without_torch("import fake_store.server", roots=[tmp_path])
    assert (violation.path, violation.line, violation.rule) == ("fake_store/server.py", 3, "e")
    assert violation.message.endswith("fake_store/server.py:3 -> fake_store/model.py:3 -> torch")


def test_what_the_rules_allow():
    allowed = {
        "kvmesh/cli/launcher.py": "def f():\n    from cache_store.server import serve\n",
        "gateway/server.py": "from gateway.router import Router\nfrom kvmesh.mesh.server import start_server\n",
        "tests/test_x.py": "from bench import mesh\nfrom training import train\nimport gateway, cache_store\n",
        "bench/x.py": "from tests.factories import make\nfrom gateway.layout import PromptLayout\n",
        "kvmesh/engine/engine.py": "from . import model\nfrom kvmesh.engine.sampling import sample\nimport torch\n",
        "kvmesh/transport/__init__.py": "from .base import Transport\n",
        "scripts/train.py": "from training.train import main\n",
    }
    assert [v for path, source in allowed.items() for v in check_source(path, source)] == []
    assert {
        i.module for i in imports_of("from .base import Transport\n", "kvmesh/transport/__init__.py")
    } == {
        "kvmesh.transport.base",
        "kvmesh.transport.base.Transport",
    }


# The tree keeps the rules.


@pytest.mark.parametrize("rule", sorted(CHECKERS))
def test_the_tree_keeps_import_rule(rule):
    violations = [str(v) for v in tree_violations() if v.rule == rule]
    assert not violations, "\n".join(violations)


def test_the_tree_is_read():
    assert {"kvmesh/engine/engine.py", "cache_store/server.py", "kvmesh/cli/main.py"} <= set(python_files())


def test_the_cache_store_process_never_imports_torch():
    violations = check_cache_store_without_torch(CACHE_STORE_PROCESS)
    assert not violations, "\n".join(map(str, violations))
