"""tests/syncs.py counts each kind of planted host-device sync, and nothing in sync-free code."""
import pytest
import torch

from syncs import count_syncs

x = torch.arange(6.0)
mask = x > 2
counts = torch.tensor([1, 2, 3])

PLANTED = {
    "item": lambda: x.sum().item(),
    "int": lambda: int(x.max()),
    "if tensor": lambda: 1 if x.sum() > 0 else 0,
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "print": lambda: repr(x),
    "nonzero": lambda: x.nonzero(),
    "where(cond)": lambda: torch.where(mask),
    "bool index": lambda: x[mask],
    "bool index assign": lambda: x.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: x.masked_select(mask),
    "repeat_interleave no size": lambda: torch.repeat_interleave(x[:3], counts),
    "repeat_interleave counts only": lambda: torch.repeat_interleave(counts),
    "unique": lambda: torch.unique(counts),
    "equal": lambda: torch.equal(x, x),
}

CLEAN = {
    "arithmetic": lambda: (x * 2 + 1).exp().sum(),
    "nonzero_static": lambda: x.nonzero_static(size=3),
    "repeat_interleave sized": lambda: torch.repeat_interleave(x[:3], counts, output_size=6),
    "repeat_interleave int": lambda: x.repeat_interleave(2),
    "long index": lambda: x[counts],
    "masked_fill": lambda: x.masked_fill(mask, 0.0),
    "where(cond, a, b)": lambda: torch.where(mask, x, -x),
}


@pytest.mark.parametrize("name", PLANTED)
def test_counts_a_planted_sync(name):
    with count_syncs() as c:
        PLANTED[name]()
    assert c.count >= 1, name
    assert all("test_syncs.py" in w for w in c.where), c.where  # names the line that synced


@pytest.mark.parametrize("name", CLEAN)
def test_sync_free_ops_count_zero(name):
    with count_syncs() as c:
        CLEAN[name]()
    assert c.count == 0, c.where


class _PlantedInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * 2

    @staticmethod
    def backward(ctx, g):
        g.sum().item()  # the planted sync
        return g * 2


def test_counts_syncs_inside_backward():
    a = torch.ones(3, requires_grad=True)
    with count_syncs() as c:
        _PlantedInBackward.apply(a).sum().backward()
    assert c.count == 1, c.where


def test_restores_tensor_methods():
    with count_syncs():
        pass
    with count_syncs() as c:
        pass
    x.tolist()  # outside: not recorded
    assert c.count == 0 and "count_syncs" not in repr(torch.Tensor.tolist)
