"""The package's import structure, from a fresh import graph (imports inside functions included):
import-linter's contracts (pyproject.toml), no cycle between any two modules, and no private name
(_x) of one package taken by another. `make test` also runs `lint-imports` itself."""
import ast
import os
from pathlib import Path

import pytest

# grimp (import-linter's graph) is a CI/dev tool: where it is missing (the GPU machines, which run every test module
# for the cuda ones) this module skips instead of failing the whole run's collection; CI must have it
if os.environ.get("CI") == "true":
    import grimp
else:
    grimp = pytest.importorskip("grimp", reason="grimp (import-linter) not installed: pip install import-linter")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"far": ROOT / "python" / "far", "far_kernels": ROOT / "far_kernels"}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("far", "far_kernels", include_external_packages=False, cache_dir=None)


def _modules():
    """{dotted module name: (file, is_package)} of both packages."""
    out = {}
    for top, base in SOURCES.items():
        for f in base.rglob("*.py"):
            parts = (top,) + f.relative_to(base).with_suffix("").parts
            pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if pkg else parts)] = (f, pkg)
    return out


def _package(module: str, modules: dict) -> str:
    """The package a module belongs to: itself for a package, else its parent."""
    return module if modules[module][1] else module.rpartition(".")[0]


# far_kernels._ext imports the compiled far_kernels._C, which a graph of Python files can only see as the
# package far_kernels itself (the same exception as pyproject.toml's ignore_imports)
IGNORED = {("far_kernels._ext", "far_kernels")}


def test_import_linter_contracts_hold():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                        "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]  # the contracts live in pyproject.toml


def test_every_package_is_forbidden_the_cli():
    """The "nothing imports the command line" contract names its source modules one by one: each of far's
    top-level modules and packages (a new one included) other than far.cli itself must be among them."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    sources = next(c["source_modules"] for c in contracts if c.get("forbidden_modules") == ["far.cli"])
    top = {f"far.{p.stem if p.suffix else p.name}" for p in SOURCES["far"].iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert top - {"far.cli"} - set(sources) == set() and "far_kernels" in sources


def test_no_import_cycles_between_modules(graph):
    """Tarjan's strongly connected components over module -> module imports: every one is a single module."""
    nodes = sorted(graph.modules)
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if (v, w) in IGNORED:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in nodes:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _private_name_uses(path: Path, module: str, modules: dict):
    """(line, owner module, name) for every private name of one of our modules that `module` takes:
    `from M import _x` (not a submodule) and attribute chains `M._x` on an imported module."""
    tree = ast.parse(path.read_text())
    is_pkg = modules[module][1]
    here = module if is_pkg else module.rpartition(".")[0]
    bound = {}  # local name -> our module it refers to
    found = []

    def private(n: str) -> bool:
        return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in SOURCES:
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        bound[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] not in SOURCES or base not in modules:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    bound[a.asname or a.name] = sub
                elif private(a.name):
                    found.append((node.lineno, base, a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in bound:
                continue
            mod = bound[cur.id]
            for attr in reversed(chain):
                if f"{mod}.{attr}" in modules:
                    mod = f"{mod}.{attr}"
                    continue
                if private(attr):
                    found.append((node.lineno, mod, attr))
                break
    return [(line, owner, name) for line, owner, name in found if _package(owner, modules) != here]


def test_no_private_names_across_packages():
    modules = _modules()
    bad = []
    for module, (path, _) in sorted(modules.items()):
        for line, owner, name in _private_name_uses(path, module, modules):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {module} takes {owner}.{name}")
    assert not bad, "private names taken across packages:\n" + "\n".join(bad)


def test_the_checks_catch_violations(tmp_path):
    """The private-name check itself finds a planted violation (so the test above can fail)."""
    modules = _modules()
    planted = tmp_path / "planted.py"
    planted.write_text("import far_kernels\nfrom far.data import _check_data_cfg\n"
                       "x = far_kernels.dispatch._triton_reason\n")
    modules["far.imc.planted"] = (planted, False)
    found = {(owner, name) for _, owner, name in _private_name_uses(planted, "far.imc.planted", modules)}
    assert found == {("far.data", "_check_data_cfg"), ("far_kernels.dispatch", "_triton_reason")}
