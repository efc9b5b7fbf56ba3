"""Weight decay follows megatron-core's groups: biases and 1-D parameters are not decayed (its `wd_mult` 0),
every other weight is; the same with megatron-core's optimizer and with FSDP2's AdamW (set_lr applies it)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

OPTIM = SimpleNamespace(lr=0.1, weight_decay=0.5, betas=(0.9, 0.95), eps=1e-8, clip_grad=0.0)
PAR = SimpleNamespace(tp=1, pp=1, cp=1, sequence_parallel=False, virtual_pp=None, distributed_optimizer=False,
                      fsdp=False, grad_reduce_in_fp32=True)


def _decayed_after_a_zero_gradient_step(fsdp: bool, pg) -> dict[str, bool]:
    from megatron_regdpo.models.wan.arch import SIZES
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.training.optimizer import build_optimizer, set_lr

    torch.manual_seed(0)
    par = SimpleNamespace(**{**vars(PAR), "fsdp": fsdp})
    model = build_wan(SIZES["debug"], pg, parallel=par)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunk = wrap_data_parallel(model, par, pg)
    opt = build_optimizer(OPTIM, par, torch.float32, [chunk], pg)
    for p in model.parameters():  # zero gradients: AdamW's only change is the decoupled decay
        grad = torch.zeros_like(p)
        if hasattr(p, "main_grad"):
            p.main_grad = grad
        p.grad = grad
    set_lr(opt, OPTIM.lr, OPTIM.weight_decay)
    opt.prepare_grads()
    opt.step_with_ready_grads()
    after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    return {n: not torch.equal(before[n], after[n]) for n in before}


def test_biases_and_vectors_are_not_decayed(pg):
    for fsdp in (False, True):
        decayed = _decayed_after_a_zero_gradient_step(fsdp, pg)
        for name, changed in decayed.items():
            if name.endswith(".bias"):
                assert not changed, f"{name} decayed (fsdp={fsdp})"
        assert any(decayed[n] for n in decayed if n.endswith("linear_qkv.weight")), f"fsdp={fsdp}"
