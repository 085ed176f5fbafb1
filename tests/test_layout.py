"""The package's shape: no import cycles (imports inside functions count), layers that point one
way (``config`` imports only ``errors``, ``model/`` never ``demo/``, ``kernels/`` nothing of
``medix_fast`` but itself), the kernels import with torch + triton alone, and the config without
torch or transformers; configs/__init__.py lists every config.

Run: pytest tests/test_layout.py
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "medix_fast"
KERNELS = ROOT / "kernels"  # installed as medix_fast.kernels


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``kernels/`` as ``medix_fast.kernels``)."""
    found = {}
    for base, prefix in ((PACKAGE, "medix_fast"), (KERNELS, "medix_fast.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import medix_fast.x.y` names a module or an attribute
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
        # importing a.b.c runs the __init__ of a.b first, unless a.b is one of name's own packages
        for target in list(out):
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in known and not name.startswith(parent + "."):
                    out.add(parent)
    out.discard(name)
    out.discard("medix_fast")  # the root __init__ holds only the version
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_resolve_relative_and_function_level_imports(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from .y import f\n\ndef g():\n    from ..z import h\n    import medix_fast.p.q\n")
    known = {"medix_fast.a.x", "medix_fast.a.y", "medix_fast.z", "medix_fast.p", "medix_fast.p.q"}
    assert imports("medix_fast.a.x", path, known) == {"medix_fast.a.y", "medix_fast.z", "medix_fast.p", "medix_fast.p.q"}


def test_no_import_cycles():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# (importer prefix, imported prefix, why): what a layer may not import, functions included
FORBIDDEN = (
    ("medix_fast.config", "medix_fast.", "the bottom layer: read and checked before anything heavy loads"),
    ("medix_fast.model", "medix_fast.demo", "the demo builds its tiny models with model/, not the reverse"),
    ("medix_fast.kernels", "medix_fast.", "the kernels stand alone (torch + triton); callers pass what they need"),
)
ALLOWED = {"medix_fast.config": {"medix_fast.errors"}, "medix_fast.kernels": {"medix_fast.kernels"}}
# The loss options' check still goes through the kernels' LossOptions (inside a function: the
# import of the config stays light); the one loss table (issue 36, deliverable 2) removes it.
PENDING = {("medix_fast.config", "medix_fast.kernels")}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every ``a -> b`` of the import graph that FORBIDDEN rules out."""
    out = []
    for name, targets in sorted(graph.items()):
        for importer, imported, why in FORBIDDEN:
            if name != importer and not name.startswith(importer + "."):
                continue
            allowed = ALLOWED.get(importer, set())
            for target in sorted(targets):
                inside = any(target == a or target.startswith(a + ".") for a in allowed)
                if (target + ".").startswith(imported) and not inside and (name, target) not in PENDING:
                    out.append(f"{name} -> {target} ({why})")
    return out


def test_layer_violations_finds_planted_imports():
    graph = {"medix_fast.config": {"medix_fast.errors", "medix_fast.generate.tokens"},
             "medix_fast.model.loading": {"medix_fast.demo.cache", "medix_fast.errors"},
             "medix_fast.kernels.compile_check": {"medix_fast.kernels.logprobs", "medix_fast.generate"},
             "medix_fast.demo.tiny": {"medix_fast.model.compat"}}
    assert layer_violations(graph) == [
        "medix_fast.config -> medix_fast.generate.tokens (the bottom layer: read and checked before anything "
        "heavy loads)",
        "medix_fast.kernels.compile_check -> medix_fast.generate (the kernels stand alone (torch + triton); "
        "callers pass what they need)",
        "medix_fast.model.loading -> medix_fast.demo.cache (the demo builds its tiny models with model/, not the "
        "reverse)"]


def test_layers_point_one_way():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    bad = layer_violations(graph)
    assert not bad, "\n".join(bad)


def test_config_imports_without_torch_or_transformers():
    """``import medix_fast.config`` (what every command reads first) loads no heavy package."""
    code = "import sys, medix_fast.config\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    heavy = set(out.split()) & {"torch", "transformers", "triton", "numpy"}
    assert not heavy, f"import medix_fast.config loads {sorted(heavy)}"


def test_kernels_import_with_torch_and_triton_alone():
    """No third-party package but torch and triton is imported by ``import medix_fast.kernels``."""
    code = (
        "import sys\n"
        "import medix_fast.kernels\n"
        "std = set(sys.stdlib_module_names)\n"
        "third = sorted({m.split('.')[0] for m in sys.modules} - std - {'medix_fast', 'torch', 'triton', '__main__'})\n"
        "print(' '.join(third))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    # torch's own dependencies (numpy, sympy, ...) are allowed: they come with torch; nothing of ours beyond it
    extra = set(out.split()) - _torch_closure()
    assert not extra, f"medix_fast.kernels pulls in {sorted(extra)}"


def _torch_closure() -> set[str]:
    code = ("import sys, torch, triton\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_every_config_is_listed_in_configs_init():
    """The docstring's listing of ``configs/`` names exactly the YAML files there (eval/ included)."""
    folder = ROOT / "configs"
    listed = {line.split()[0] for line in (folder / "__init__.py").read_text().splitlines()
              if line.split() and line.split()[0].endswith(".yaml")}
    present = {str(p.relative_to(folder)) for p in folder.rglob("*.yaml")}
    assert listed == present, f"listed only: {sorted(listed - present)}; not listed: {sorted(present - listed)}"
