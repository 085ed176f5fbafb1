"""Element offsets past 2^31 in the Triton kernels (under the interpreter), at a size the CPU runs.

The operands are views with a huge row stride over a sparse, privately mapped file: the offset of
the last row passes 2^31 elements while only the touched pages use memory (a few hundred KB). A
32-bit ``row * stride`` wraps there and reads the wrong (or no mapped) memory, so each check runs
in a fresh process: a crash is a failure, not the end of the test session.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sparse files and MAP_PRIVATE")

COMMON = """
import os, torch
from medix_fast.kernels import force_backend, fused_linear_logprobs
from medix_fast.kernels.logits_rows import row_grad, row_stats

def sparse_rows(path, values, row_stride):
    rows, cols = values.shape
    numel = (rows - 1) * row_stride + cols
    with open(path, "wb") as f:
        f.truncate(numel * values.element_size())  # a hole: no disk, no memory until touched
    storage = torch.from_file(path, shared=False, size=numel, dtype=values.dtype)
    view = storage.as_strided((rows, cols), (row_stride, 1))
    view.copy_(values)
    assert (rows - 1) * row_stride >= 2**31
    return view

g = torch.Generator().manual_seed(0)
"""

HEAD = """
H, V = 40, 7
h = sparse_rows(os.path.join(TMP, "h"), torch.randn(3, H, generator=g), 2**30 + 7)  # row 2 at 2^31 + 14
w = sparse_rows(os.path.join(TMP, "w"), torch.randn(V, H, generator=g) / 4, 2**29 + 3)  # row 6 at 3 * 2^30 + 18
t = torch.tensor([6, 0, 5])
hh, ww = h.clone().double().requires_grad_(), w.clone().double().requires_grad_()
want = torch.log_softmax(hh @ ww.t(), -1).gather(1, t[:, None]).squeeze(1)
want_grads = torch.autograd.grad(want.sum(), (hh, ww))
h.requires_grad_(); w.requires_grad_()
with force_backend("triton"):
    got = fused_linear_logprobs(h, w, t)
    got_grads = torch.autograd.grad(got.sum(), (h, w))
torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
for x, y in zip(got_grads, want_grads):
    torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)
print("OK")
"""

ROWS = """
V = 37
z = sparse_rows(os.path.join(TMP, "z"), torch.randn(3, V, generator=g) * 3, 2**30 + 1)
t = torch.tensor([1, 36, 0])
zz = z.clone().double()
lsm = torch.log_softmax(zz, -1)
logp, lse, ent = row_stats(z, t, triton_path=True)
torch.testing.assert_close(logp.double(), lsm.gather(1, t[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
torch.testing.assert_close(ent.double(), -(lsm.exp() * lsm).sum(-1), rtol=1e-5, atol=1e-5)
g_lp = torch.randn(3, generator=g)
want = (torch.nn.functional.one_hot(t, V).double() - lsm.exp()) * g_lp.double()[:, None]
dz = row_grad(z, t, lse, ent, g_lp, None, 1.0, torch.float32, triton_path=True)  # in place over z
torch.testing.assert_close(dz.double(), want, rtol=1e-5, atol=1e-5)
print("OK")
"""


@pytest.mark.parametrize("body", [HEAD, ROWS], ids=["lm_head_forward_backward", "row_kernels"])
def test_offsets_past_2_31(tmp_path, body):
    code = f"TMP = {str(tmp_path)!r}\n" + textwrap.dedent(COMMON) + textwrap.dedent(body)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (done.returncode, done.stderr[-3000:])
