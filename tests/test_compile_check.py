"""Every Triton kernel of the project compiles for sm_80 and sm_90 without a GPU, at the launches
its launcher picks for the shipped shapes, within the arch's shared memory, with no register spill
and with tensor-core instructions wherever it has a ``tl.dot`` (exact fp32 excepted)
(``medix_fast/kernels/compile_check.py``; ``python -m medix_fast.kernels --compile-check``).

The kernels compile in one subprocess with ``TRITON_INTERPRET`` unset (this suite's conftest sets
it, and it must be unset before the kernels are imported); its results, shared by every test here,
come back as JSON. With ``PYTHONPATH`` holding triton 3.6 (the GPU machine's, ``.ci/run``'s
lowest-versions step) the subprocess compiles with that triton.

Run: pytest tests/test_compile_check.py
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
SOURCES = sorted((ROOT / "kernels").glob("*.py"))

SCRIPT = """
import dataclasses, json, sys, torch
from medix_fast.generate.decode_shapes import shipped
from medix_fast.kernels import compile_check as cc, logprobs
shapes = shipped()  # the kernels know no model: the engine's decode shapes come from here
out = {"results": [cc.as_dict(r) for arch in (80, 90) for r in cc.check(arch, decode_shapes=shapes)], "planted": {}}
# planted defects: the detector must see each one
fwd = next(l for l in cc.launches(90) if l.label.startswith("lm_head_fwd float32 ieee H=4096"))
old_ieee = dict(fwd.constexprs, BLOCK_K=64)  # the ieee tile before the check: 64 x 128 x 64 at 4 warps
spill = dataclasses.replace(fwd, constexprs=tuple(sorted(old_ieee.items())), num_warps=4, label="planted spill")
tf32 = next(l for l in cc.launches(90) if l.label.startswith("lm_head_fwd float32 tf32 H=4096"))
big = dict(tf32.constexprs, BLOCK_K=128)  # 4 stages of 64 x 128 fp32 operand tiles: > 227 KB
smem = dataclasses.replace(tf32, constexprs=tuple(sorted(big.items())), num_stages=4, label="planted smem")
exact = dataclasses.replace(fwd, exact=False, label="planted no tensor cores")  # ieee claimed as tensor-core
busy = dataclasses.replace(tf32, programs_per_sm=2, label="planted occupancy")
for launch in (spill, smem, exact, busy):
    res, ptx = cc._compile(launch, 90)
    if ptx:
        res.registers, res.spill_stores, res.spill_loads = cc.ptxas_usage(ptx, 90)
        res.blocks_per_sm = cc.blocks_per_sm(res.registers, res.shared, launch.num_warps, cc.ARCHS[90])
        res.problems = cc.problems(res)
    out["planted"][launch.label] = res.problems
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def jit_functions() -> dict[str, str]:
    """Every ``@triton.jit`` function of the project: name -> its source."""
    found = {}
    for path in SOURCES:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                found[node.name] = ast.get_source_segment(text, node)
    return found


def test_every_triton_kernel_is_compiled(compiled):
    """Each jit function is launched by the check, or called (at any depth) by a kernel that is."""
    functions = jit_functions()
    launched = {r["kernel"] for r in compiled["results"]}
    assert len(functions) >= 7 and launched <= set(functions)
    covered, grew = set(launched), True
    while grew:
        reached = {name for name in functions if any(f"{name}(" in functions[k] for k in covered)}
        grew = not reached <= covered
        covered |= reached
    for name in functions:
        assert name in covered, f"{name} is never compiled"
    for arch in ARCHS:
        assert {r["kernel"] for r in compiled["results"] if r["arch"] == arch} == launched


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", ["lm_head_fwd", "row_stats", "row_grad", "group_advantages", "split decode",
                                    "combine decode"])
def test_kernels_fit_the_arch(compiled, arch, family):
    results = [r for r in compiled["results"] if r["arch"] == arch and r["label"].startswith(family)]
    assert results
    bad = [f"{r['label']}: {'; '.join(r['problems'])}" for r in results if r["problems"]]
    assert not bad, "\n".join(bad)


def test_tensor_cores_where_expected(compiled):
    """wgmma in the sm_90 bf16 / tf32 LM-head forward, mma.sync on sm_80; mma or wgmma in the bf16
    decode kernel; none in the exact fp32 ones."""
    by = {(r["arch"], r["label"]): r for r in compiled["results"]}
    for (arch, label), r in by.items():
        if label.startswith("lm_head_fwd") and "ieee" not in label:
            assert r["tensor_cores"] == ("wgmma" if arch == 90 else "mma"), label
        if label.startswith("split decode") and "bfloat16" in label:
            assert r["tensor_cores"] in ("mma", "wgmma"), label
        if "ieee" in label or (label.startswith("split decode") and "float32" in label):
            assert r["tensor_cores"] == "-" and r["has_dot"], label


def test_the_decode_covers_every_shipped_model_bucket_and_part(compiled):
    from medix_fast.generate.decode_shapes import shipped

    labels = {r["label"] for r in compiled["results"] if r["arch"] == 90}
    for shape in shipped():
        for part in ("prompt", "own"):
            assert any(f"split decode {part} {shape.model} bfloat16" in x for x in labels), (shape.model, part)
    runs = [r for r in compiled["results"] if r["label"].startswith("split decode")]
    assert len({r["label"].rsplit("splits=", 1)[1] for r in runs}) >= 4  # several split counts, one binary


def test_planted_defects_are_caught(compiled):
    """A tile that spills, one over the shared memory limit, a tl.dot claimed to use tensor cores
    that has none, and a launcher assuming more programs per SM than fit: each is a problem."""
    planted = compiled["planted"]
    assert any("register spill" in p for p in planted["planted spill"])
    assert any("shared memory" in p or "compile error" in p for p in planted["planted smem"])
    assert any("tensor-core" in p for p in planted["planted no tensor cores"])
    assert any("blocks per SM" in p for p in planted["planted occupancy"])


def test_the_cli_compiles_the_decode_kernel_at_the_shapes_its_hook_returns(monkeypatch, capsys):
    """``--decode-shapes MODULE:FUNCTION`` hands the function's shapes to the check (the kernels
    import nothing of the engine); the default names the engine's shipped shapes; '' passes none."""
    from medix_fast.generate.decode_shapes import shipped
    from medix_fast.kernels import __main__ as cli, compile_check

    seen = {}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CLI would re-execute itself without it
    monkeypatch.setattr(compile_check, "main", lambda archs, select, shapes: seen.update(archs=archs, shapes=shapes))
    monkeypatch.setitem(sys.modules, "planted_shapes", types.SimpleNamespace(shapes=lambda: ["a shape"]))
    cli.main(["--compile-check", "--arch", "90", "--decode-shapes", "planted_shapes:shapes"])
    assert seen == {"archs": [90], "shapes": ["a shape"]}
    cli.main(["--compile-check", "--decode-shapes", ""])
    assert seen == {"archs": [80, 90], "shapes": ()}
    module, _, function = cli.DECODE_SHAPES.partition(":")
    assert getattr(sys.modules.get(module) or __import__(module, fromlist=[function]), function) is shipped
    with pytest.raises(SystemExit):
        cli.main(["--compile-check", "--decode-shapes", "planted_shapes:nothing"])
    assert "--decode-shapes planted_shapes:nothing" in capsys.readouterr().err
