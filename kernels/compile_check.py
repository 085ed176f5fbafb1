"""Every Triton kernel compiled for a GPU target on a machine without a GPU, at the launches its
launcher picks for the shipped shapes, and checked against the target's limits.

    python -m medix_fast.kernels --compile-check [--arch 80 90 100]        # exit 1 on a problem
    results = check(arch=90, decode_shapes=shipped())                      # list of Result

A stub driver reports ``GPUTarget("cuda", arch, 32)`` and ``JITFunction.warmup`` compiles (PTX,
then ptxas to a cubin) without launching; the launches come from the launchers' own tile
functions (``logprobs.tiles`` / ``launch_shape`` / ``dot_precision``, ``advantage.tiles``,
``logits_rows.gpu_block_v``, ``triton_decode.decode_launch`` over the decode shapes the caller
passes: the kernels know no model, so the engine's ``medix_fast.generate.decode_shapes.shipped()``
comes in as an argument, or through the CLI's ``--decode-shapes MODULE:FUNCTION``, whose default
names it). Each compiled binary is checked for:
- shared memory (``metadata.shared``) within the arch's per-block limit;
- no register spill (``ptxas -v`` on its PTX, with the ptxas the triton wheel ships);
- tensor-core instructions (``mma`` / ``wgmma`` in the PTX) in every kernel with a ``tl.dot``,
  except exact fp32 (``input_precision="ieee"``), which has none by design;
- blocks per SM (from registers, shared memory and warps) at least what the launcher assumes
  (``logprobs.Tiles.programs_per_sm``).
Binaries are cached per (kernel, arguments, constants, arch) in the process (and by triton on
disk), so the launches that share a binary compile once. ``TRITON_INTERPRET`` must be unset
before the kernels are imported (the CLI re-executes itself without it; the test runs a subprocess).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton

from . import advantage, logits_rows, logprobs, triton_decode as td
from .advantage import ESTIMATORS


@dataclass(frozen=True)
class Arch:
    name: str
    sms: int  # the launchers size their grids from it
    smem_block: int  # bytes of shared memory one block may use (opt-in maximum)
    smem_sm: int  # bytes per SM (each resident block also takes 1 KiB reserved)
    regs_sm: int = 65536
    threads_sm: int = 2048


ARCHS = {80: Arch("sm_80 (A100)", 108, 163 * 1024, 164 * 1024),
         90: Arch("sm_90 (H100/H200)", 132, 227 * 1024, 228 * 1024),
         100: Arch("sm_100 (B200)", 148, 227 * 1024, 228 * 1024)}

LM_HEAD = dict(n=16384, hidden=(2048, 4096), vocab=151936)  # the shipped shapes: tokens per call, H, V
GROUPS = ((5, 512, ESTIMATORS), (5, 64, ("grpo",)), (8, 16, ("grpo",)))  # (G, groups, estimators): shipped, tiny


@dataclass(frozen=True)
class Launch:
    """One kernel launch as its launcher makes it: ``args`` with a torch dtype for each tensor."""
    label: str
    kernel: object  # a triton JITFunction
    args: tuple
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int = 4
    num_stages: int = 3
    exact: bool = False  # exact fp32 products asked for: no tensor cores expected
    programs_per_sm: int = 1  # what the launcher's grid assumes

    @property
    def key(self) -> tuple:
        """What the binary depends on: an integer argument only by triton's specialisation of it
        (1, a multiple of 16, or neither; nothing for ``do_not_specialize``), a float not at all."""
        def spec(param, a):
            if isinstance(a, (torch.dtype, bool)):
                return a
            if isinstance(a, float) or param.do_not_specialize:
                return "-"
            return 1 if a == 1 else 16 if a % 16 == 0 else 0
        args = tuple(spec(p, a) for p, a in zip(self.kernel.params, self.args))
        return (self.kernel.fn.__name__, args, self.constexprs, self.num_warps, self.num_stages)


@dataclass
class Result:
    launch: Launch
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    tensor_cores: str = "-"  # "wgmma", "mma" or "-"
    has_dot: bool = False
    blocks_per_sm: int = 0
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- launches
def lm_head_launches(arch: int) -> list[Launch]:
    """The fused LM-head forward (``logprobs._triton_stats``) at the shipped shapes, every dtype and
    fp32 precision, and the backward's row kernels (``logits_rows``)."""
    out = []
    n, vocab, sms = LM_HEAD["n"], LM_HEAD["vocab"], ARCHS[arch].sms
    for dtype, precision in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        t = logprobs.tiles(dtype, vocab, precision, arch // 10)
        splits, v_per_split, _ = logprobs.launch_shape(n, vocab, t, sms)
        prec = logprobs.dot_precision(dtype, precision)
        for hidden in LM_HEAD["hidden"]:
            for softcap in (False, True):  # Gemma-2's final_logit_softcapping compiles its own variant
                args = (dtype, dtype, dtype, torch.int64, torch.float32, torch.float32, torch.float32, torch.float32,
                        n, vocab, hidden, hidden, hidden, 1.0, 1.0, v_per_split)
                consts = (("BLOCK_K", t.block_k), ("BLOCK_M", t.block_m), ("BLOCK_V", t.block_v),
                          ("HAS_BIAS", False), ("HAS_SOFTCAP", softcap), ("PRECISION", prec))
                out.append(Launch(f"lm_head_fwd {str(dtype)[6:]} {precision} H={hidden} splits={splits}"
                                  + (" softcap" if softcap else ""), logprobs._forward_kernel, args, consts,
                                  t.num_warps, logprobs.NUM_STAGES, exact=prec == "ieee",
                                  programs_per_sm=t.programs_per_sm))
    block_v = logits_rows.gpu_block_v(vocab)
    out.append(Launch(f"row_stats V={vocab}", logits_rows._row_stats_kernel,
                      (torch.float32, torch.int64, torch.float32, torch.float32, torch.float32, vocab, vocab),
                      (("BLOCK_V", block_v),)))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for gent in (False, True):
            for softcap in (False, True):
                args = (torch.float32, dtype, torch.int64, torch.float32, torch.float32, torch.float32, torch.float32,
                        vocab, vocab, 1.0, 1.0)
                out.append(Launch(f"row_grad {str(dtype)[6:]} entropy={gent}" + (" softcap" if softcap else ""),
                                  logits_rows._row_grad_kernel, args,
                                  (("BLOCK_V", block_v), ("HAS_GENT", gent), ("HAS_SOFTCAP", softcap))))
    return out


def advantage_launches() -> list[Launch]:
    out = []
    for group, groups, estimators in GROUPS:
        block_g, block_s, warps = advantage.tiles(groups, group)
        for name in estimators:
            est = advantage.ESTIMATORS.index(name)
            out.append(Launch(f"group_advantages G={group} groups={groups} {name}", advantage._group_advantage_kernel,
                              (torch.float32, torch.float32, torch.float32, torch.float32, groups, group, 1e-6),
                              (("BLOCK_G", block_g), ("BLOCK_S", block_s), ("ESTIMATOR", est)), warps))
    return out


def decode_launches(sms: int, decode_shapes: Sequence = ()) -> list[Launch]:
    """``paged_decode``'s split and (unless the split kernel finishes alone) combine kernels for each
    of ``decode_shapes`` (one per model, as ``medix_fast.generate.decode_shapes.DecodeShape``:
    ``model``, ``heads``, ``kv_heads``, ``dim``, ``block_size``, ``prompt_len``, ``new_len``,
    ``buckets`` and ``launches(...)``) at every batch bucket, both cascade parts, at the typical (1/4)
    and the longest lengths (every split count they pick), bf16 (the shipped compute dtype) and fp32."""
    out = []
    for shape in decode_shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for bucket in shape.buckets:
                for prompt_len, new_len in ((shape.prompt_len // 4, shape.new_len // 4),
                                            (shape.prompt_len, shape.new_len)):
                    parts = shape.launches(bucket, prompt_len, new_len, sms, dtype)
                    for part, (_, t) in zip(("prompt", "own"), parts):
                        label = (f"decode {part} {shape.model} {str(dtype)[6:]} R={t.r} G={t.group} "
                                 f"splits={t.splits}")
                        split_args = (dtype, dtype, dtype, torch.int32, torch.int32, torch.int64, torch.float32,
                                      torch.float32, torch.float32, torch.float32, torch.float32, torch.float32,
                                      torch.float32, shape.heads, bucket, 0.088, shape.heads * shape.dim,
                                      shape.dim, shape.block_size * shape.kv_heads * shape.dim,
                                      shape.kv_heads * shape.dim, shape.dim,
                                      shape.block_size * shape.kv_heads * shape.dim, shape.kv_heads * shape.dim,
                                      shape.dim, 64, t.group, t.splits)
                        consts = (("BLOCK_D", t.block_d), ("BLOCK_M", t.block_m), ("BLOCK_N", t.block_n),
                                  ("BS", shape.block_size), ("D", shape.dim), ("EXACT", t.exact), ("GM", t.group),
                                  ("QCHUNKS", t.qchunks), ("R", t.r))
                        one = (("HAS_PRIOR", part == "own"), ("ONE_SPLIT", t.direct))
                        out.append(Launch("split " + label, td._split_kernel, split_args, tuple(sorted(consts + one)),
                                          t.num_warps, exact=t.exact))
                        if t.direct:  # the split kernel writes the rows: no combine
                            continue
                        comb_args = (torch.float32, torch.float32, torch.float32, torch.int32, torch.int64, torch.float32,
                                     torch.float32, torch.float32, torch.float32, bucket, t.group, shape.heads,
                                     t.splits)
                        comb = tuple((k, v) for k, v in consts if k not in ("BLOCK_N", "BS", "EXACT"))
                        out.append(Launch("combine " + label, td._combine_kernel, comb_args,
                                          tuple(sorted(comb + (("HAS_PRIOR", part == "own"),)))))
    return out


def launches(arch: int, decode_shapes: Sequence = ()) -> list[Launch]:
    sms = ARCHS[arch].sms
    return lm_head_launches(arch) + advantage_launches() + decode_launches(sms, decode_shapes)


# ----------------------------------------------------------------------------- compiling
class _StubDriver:
    """What ``JITFunction.run(warmup=True)`` asks of the driver, for a GPU that is not there."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return ("compile-check", self.arch)  # the kernels' binary caches are per device: one per arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def gpu_target(arch: int):
    """Triton compiles for ``sm_<arch>`` inside (no launch is possible)."""
    from triton.runtime import driver
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset before the kernels are imported")
    previous = driver._active
    driver.set_active(_StubDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


_CACHE: dict[tuple, Result] = {}  # (launch key, arch) -> the checked binary


def _compile(launch: Launch, arch: int) -> tuple[Result, str]:
    """(result without ptxas's figures, PTX); a kernel that does not compile is a problem of the
    result, not an exception."""
    result = Result(launch, arch)
    try:
        with gpu_target(arch):
            kernel = launch.kernel.warmup(*launch.args, grid=(1,), num_warps=launch.num_warps,
                                          num_stages=launch.num_stages, **dict(launch.constexprs))
    except Exception as err:  # noqa: BLE001 (what this check reports)
        result.problems.append(f"compile error: {str(err).strip().splitlines()[-1][:300]}")
        return result, ""
    ptx = kernel.asm["ptx"]
    result.shared = int(kernel.metadata.shared)
    result.has_dot = "tt.dot" in kernel.asm["ttir"]
    result.tensor_cores = "wgmma" if "wgmma." in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    return result, ptx


def check(arch: int, select: str = "", decode_shapes: Sequence = ()) -> list[Result]:
    """Compile every launch for ``arch`` (those whose label contains ``select``; the decode kernel's
    at ``decode_shapes``) and check each binary: one compile per distinct binary (cached across
    calls), ``ptxas -v`` on all cores."""
    todo = {}
    chosen = [launch for launch in launches(arch, decode_shapes) if select in launch.label]
    for launch in chosen:
        if (launch.key, arch) not in _CACHE:
            todo.setdefault((launch.key, arch), launch)
    built = {key: _compile(launch, arch) for key, launch in todo.items()}
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        usage = dict(zip(built, pool.map(lambda item: ptxas_usage(item[1], arch) if item[1] else (0, 0, 0),
                                         built.values())))
    for key, (result, ptx) in built.items():
        if ptx:
            result.registers, result.spill_stores, result.spill_loads = usage[key]
            result.blocks_per_sm = blocks_per_sm(result.registers, result.shared, result.launch.num_warps,
                                                 ARCHS[arch])
            result.problems = problems(result)
        _CACHE[key] = result
    return [dataclasses.replace(_CACHE[launch.key, arch], launch=launch) for launch in chosen]


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` (the triton wheel's)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(regs.group(1)) if regs else 0, int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0


def blocks_per_sm(registers: int, shared: int, num_warps: int, arch: Arch) -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), shared memory (plus
    1 KiB reserved per block) and threads."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = arch.regs_sm // (per_warp * num_warps)
    by_smem = arch.smem_sm // (shared + 1024) if shared else 32
    return max(0, min(by_regs, by_smem, arch.threads_sm // (32 * num_warps), 32))


def problems(r: Result) -> list[str]:
    arch = ARCHS[r.arch]
    out = []
    if r.shared > arch.smem_block:
        out.append(f"shared memory {r.shared} B > {arch.smem_block} B per block")
    if r.spill_stores or r.spill_loads:
        out.append(f"register spill: {r.spill_stores} B stores, {r.spill_loads} B loads")
    if r.has_dot and not r.launch.exact and r.tensor_cores == "-":
        out.append("tl.dot without tensor-core instructions")
    if r.blocks_per_sm < r.launch.programs_per_sm:
        out.append(f"{r.blocks_per_sm} blocks per SM, the launcher assumes {r.launch.programs_per_sm}")
    return out


def table(results: list[Result]) -> str:
    """One line per distinct binary: kernel, arch, config, registers, spills, shared memory, tensor cores."""
    lines = [f"{'arch':>4} {'regs':>4} {'spill B':>9} {'smem KB':>8} {'blk/SM':>6} {'TC':>5}  launch  [problems]"]
    seen = set()
    for r in results:
        if (r.launch.key, r.arch) in seen:
            continue
        seen.add((r.launch.key, r.arch))
        lines.append(f"{r.arch:>4} {r.registers:>4} {r.spill_stores:>4}/{r.spill_loads:<4} {r.shared / 1024:>8.1f} "
                     f"{r.blocks_per_sm:>6} {r.tensor_cores:>5}  {r.launch.label}"
                     + (f"  [{'; '.join(r.problems)}]" if r.problems else ""))
    return "\n".join(lines)


def as_dict(r: Result) -> dict:
    return {"arch": r.arch, "label": r.launch.label, "kernel": r.launch.kernel.fn.__name__, "registers": r.registers,
            "spill_stores": r.spill_stores, "spill_loads": r.spill_loads, "shared": r.shared,
            "tensor_cores": r.tensor_cores, "has_dot": r.has_dot, "blocks_per_sm": r.blocks_per_sm,
            "problems": r.problems}


def main(archs: list[int], select: str = "", decode_shapes: Sequence = ()) -> int:
    failed = 0
    if not decode_shapes:
        print("no decode shapes given: the paged decode kernel is not compiled")
    for arch in archs:
        results = check(arch, select, decode_shapes)
        print(f"{ARCHS[arch].name}: {len(results)} launches, "
              f"{len({r.launch.key for r in results})} binaries (triton {triton.__version__})")
        print(table(results))
        failed += sum(bool(r.problems) for r in results)
    print(f"compile check: {'FAILED, ' + str(failed) + ' launches with problems' if failed else 'ok'}")
    return 1 if failed else 0
