"""models/wan/lean.py recomputed_in_backward: a kept tensor becomes a recipe (same gradients, fewer bytes
kept, one recompute), and every tensor it does not recompute still reaches the enclosing saved-tensor hooks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_regdpo.models.wan.lean import recomputed_in_backward


def _kept(fn):
    """(output, bytes of the distinct non-parameter storages autograd keeps) of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _block(x, w1, w2, lean: bool, calls: list):
    """linear -> GELU -> (linear + a product of strided views of the GELU output)."""
    pre = F.linear(x, w1)
    act = F.gelu(pre, approximate="tanh")

    def redo():
        calls.append(1)
        return F.gelu(pre, approximate="tanh")

    def rest():
        return F.linear(act, w2) + (act[:, ::4] * act[:, 1::4]).sum(-1, keepdim=True)

    if not lean:
        return rest()
    with recomputed_in_backward((act.view(act.shape), redo)):  # a whole view of the target stands for it
        return rest()


def test_same_gradients_fewer_bytes_one_recompute():
    torch.manual_seed(0)
    x = torch.randn(16, 8, requires_grad=True)
    w1, w2 = torch.randn(32, 8, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    grads, kept, calls = {}, {}, []
    for lean in (False, True):
        for t in (x, w1, w2):
            t.grad = None
        out, kept[lean] = _kept(lambda: _block(x, w1, w2, lean, calls))
        out.backward(torch.ones_like(out))
        grads[lean] = [t.grad.clone() for t in (x, w1, w2)]
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)                            # the recompute is bitwise the forward's value
    assert calls == [1]                                     # once, for all three of its users
    # the GELU output is not kept; the rest (x, w's, the GELU input) reaches the enclosing hook as before
    assert kept[True] == kept[False] - 16 * 32 * 4


def test_no_graph_no_hooks():
    x = torch.randn(4, 4)
    with torch.no_grad(), recomputed_in_backward((x, lambda: x)):
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
