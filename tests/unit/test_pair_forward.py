"""objective.pair_forward: winners and losers in one forward (joint) or two (separate) give the same loss
and the same gradients; the config rejects separate forwards under pipeline parallelism."""
from __future__ import annotations

import pytest
import torch

from megatron_regdpo.config import ConfigError, load_config, validate
from megatron_regdpo.models.wan.arch import SIZES
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings, make_pair_batch
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings
from megatron_regdpo.training.step import make_forward_step

ARCH = SIZES["debug"]


def _loss_and_grads(model, mb, pair_forward):
    model.zero_grad(set_to_none=True)
    step = make_forward_step(RegDPOSettings(500.0, "diffusion_dpo", 1.0, "dgr", 1.0), None, pair_forward=pair_forward)
    out, loss_func = step(iter([mb]), model)
    loss, _ = loss_func(out)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _micro_batch() -> dict:
    g = torch.Generator().manual_seed(3)
    x0_w, x0_l = torch.randn(2, 16, 3, 4, 8, generator=g), torch.randn(2, 16, 3, 4, 8, generator=g)
    batch = make_pair_batch(x0_w, x0_l, [7, 8], seed=1, step=0, settings=FlowMatchingSettings())
    text = torch.randn(2, 5, ARCH.text_dim, generator=g)
    return {"x_t": batch.x_t_BCFHW, "timestep": batch.timestep_B, "text": torch.cat([text, text]), "image": None,
            "target": batch.target_BCFHW, "err_ref_w": torch.full((2,), 1.1), "err_ref_l": torch.full((2,), 0.9)}


def test_separate_forwards_equal_joint(pg):
    model = build_wan(ARCH, pg)
    mb = _micro_batch()
    loss_j, grads_j = _loss_and_grads(model, mb, "joint")
    loss_s, grads_s = _loss_and_grads(model, mb, "separate")
    torch.testing.assert_close(loss_s, loss_j, rtol=1e-6, atol=1e-7)
    for name, grad in grads_j.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_separate_forwards_need_one_pipeline_stage():
    cfg = load_config("recipes/base/wan_debug.yaml", ["objective.pair_forward=separate", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="pair_forward='separate' needs parallel.pp=1"):
        validate(cfg, 2, SIZES["debug"])
    with pytest.raises(ConfigError, match="pair_forward"):
        load_config("recipes/base/wan_debug.yaml", ["objective.pair_forward=both"])


def test_separate_forwards_under_fsdp2_equal_joint(pg):
    """Two forwards of each FSDP2 unit before one backward (its parameters gathered twice, its gradient
    reduced once per forward's backward) give the plain model's joint gradients."""
    from types import SimpleNamespace

    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel

    torch.manual_seed(0)
    plain = build_wan(ARCH, pg)
    torch.manual_seed(0)
    sharded = wrap_data_parallel(build_wan(ARCH, pg), SimpleNamespace(fsdp=True, grad_reduce_in_fp32=True), pg)
    mb = _micro_batch()
    loss_j, grads_j = _loss_and_grads(plain, mb, "joint")
    sharded.zero_grad_buffer()
    step = make_forward_step(RegDPOSettings(500.0, "diffusion_dpo", 1.0, "dgr", 1.0), None, pair_forward="separate")
    out, loss_func = step(iter([mb]), sharded)
    loss_s, _ = loss_func(out)
    loss_s.backward()
    torch.testing.assert_close(loss_s.detach(), loss_j, rtol=1e-6, atol=1e-7)
    for name, p in sharded.module.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads_j[name], rtol=1e-5, atol=1e-7, msg=name)
