"""Reg-DPO under context parallelism: 2 and 4 spawned gloo ranks, each holding a contiguous slice of the
token axis, against one process holding everything (float64).

Checked on every rank: the per-sample errors and the loss equal the full computation, and the rank-local
parameter gradients, SUMMED over ranks (what the data-parallel/CP gradient all-reduce does), equal the full
gradient. With 10 tokens on 4 ranks the slices are 3, 3, 2, 2: the element count must be reduced too. The
4-rank run also splits into two CP groups of 2 (CP 2 x DP 2): each reduction must stay in the group it is
given (a reduction over the world would double-count).

Also shown: the tempting shortcut, each rank computing the loss from the error of its own slice and the
ranks averaging their losses, gives a DIFFERENT loss. log-sigmoid is not linear: mean_r l(s_r) != l(mean_r s_r),
and the per-rank errors are not even the sample's error. Hence sum_across_group before the loss.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_regdpo.objectives.flow_matching import make_pair_batch, split_pair
from megatron_regdpo.objectives.per_sample import per_sample_sq_err
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings, reg_dpo_loss

pytestmark = pytest.mark.distributed

P, S, D = 2, 10, 3  # pairs, tokens per sample, channels per token
PAIR_IDS = [5, 17]
SETTINGS = RegDPOSettings(beta=500.0)  # the paper's beta, r = DGR


def _problem():
    """Identical on every process: built from fixed seeds and the keyed RNG, nothing is sent."""
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)).double()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x0_w, x0_l = torch.randn(2, P, S, D, generator=g, dtype=torch.float64)
    batch = make_pair_batch(x0_w, x0_l, PAIR_IDS, seed=123, step=4)
    return policy, reference, batch.x_t_BCFHW, batch.target_BCFHW  # latents here are [B, S, D], not [B, C, F, H, W]


def _loss_and_grads(policy, reference, x_BSD, target_BSD, group):
    pred_BSD = policy(x_BSD)
    err_pol_B = per_sample_sq_err(pred_BSD, target_BSD, group)
    with torch.no_grad():
        err_ref_B = per_sample_sq_err(reference(x_BSD), target_BSD, group)
    out = reg_dpo_loss(*split_pair(err_pol_B), *split_pair(err_ref_B), SETTINGS)
    loss = out.loss_sum / out.num_pairs
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    return loss.detach(), err_pol_B.detach(), err_ref_B, [g.detach() for g in grads], out.s_P


def _cp_rank(group, cp_rank: int, cp_size: int) -> dict:
    policy, reference, x_BSD, target_BSD = _problem()
    tokens = torch.tensor_split(torch.arange(S), cp_size)[cp_rank]  # contiguous, possibly unequal
    x_loc, target_loc = x_BSD[:, tokens], target_BSD[:, tokens]
    loss, err_pol, err_ref, grads, _ = _loss_and_grads(policy, reference, x_loc, target_loc, group)
    wrong_loss = _loss_and_grads(policy, reference, x_loc, target_loc, None)[0]  # no CP reduction
    return dict(loss=loss, err_pol=err_pol, err_ref=err_ref, grads=grads, wrong_loss=wrong_loss, x=x_BSD)


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {"world": _cp_rank(dist.group.WORLD, rank, world)}
        if world == 4:  # CP 2 x DP 2: the reduction must stay inside the group it is given
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
            out["cp2"] = _cp_rank(pairs[rank // 2], rank % 2, 2)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("world", [2, 4])
def test_cp_loss_and_grads_equal_single_rank(world, tmp_path):
    # spawn, not fork: torch state and threads do not survive a fork; a child's exception is re-raised here
    # with its traceback (torch.multiprocessing.ProcessRaisedException)
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    policy, reference, x_BSD, target_BSD = _problem()
    loss, err_pol, err_ref, grads, s_P = _loss_and_grads(policy, reference, x_BSD, target_BSD, None)
    assert bool((SETTINGS.beta_eff * s_P.abs() > 0.05).all())  # the log-sigmoid is curved here, not linear

    groups = {"world": [list(range(world))]} | ({"cp2": [[0, 1], [2, 3]]} if world == 4 else {})
    for name, members in groups.items():
        for ranks in members:
            res = [results[r][name] for r in ranks]
            for r, one in zip(ranks, res):
                torch.testing.assert_close(one["x"], x_BSD, rtol=0, atol=0)  # keyed RNG: same inputs, no broadcast
                torch.testing.assert_close(one["err_pol"], err_pol, rtol=1e-10, atol=0)
                torch.testing.assert_close(one["err_ref"], err_ref, rtol=1e-10, atol=0)
                assert abs(float(one["loss"] - loss)) <= 1e-10 * abs(float(loss)), (name, r, one["loss"], loss)
            for k, full in enumerate(grads):
                summed = sum(one["grads"][k] for one in res)
                assert _rel(summed, full) < 1e-9, (name, k, _rel(summed, full))
                # one rank's gradient is only a partial sum: the gradient all-reduce over CP is needed
                assert _rel(res[0]["grads"][k], full) > 1e-3, (name, k)
            wrong = sum(float(one["wrong_loss"]) for one in res) / len(res)
            assert abs(wrong - float(loss)) > 1e-3 * abs(float(loss)), (name, wrong, float(loss))
