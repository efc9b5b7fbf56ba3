"""The work each rank does in the parallel-parity suite, and the single-rank reference (same code).

A case builds the tiny Wan model under a layout, loads the reference weights (sliced to its shard),
wraps it in megatron-core DDP, runs one step of micro-batches through megatron-core's schedule with a
loss that is NON-LINEAR in per-sample errors (so per-rank losses would be wrong), finalizes grads and
optionally takes one optimizer step. It returns outputs, per-sample errors, losses, full-shape grads
and parameters keyed by global names, for comparison with the world-1 run.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_regdpo.models.wan.arch import WanArch

T2V = WanArch(num_layers=4, num_heads=4, head_dim=16, ffn_dim=128, text_dim=32, freq_dim=32)
ARCHS = {"t2v": T2V, "i2v": dataclasses.replace(T2V, in_channels=36, image_dim=24, image_tokens=5)}
LATENT = (3, 4, 8)           # -> token grid (3, 2, 4): 24 tokens, divisible by CP 4 and by TP2 x CP2
TOKENS, PAIRS, TEXT_LEN, BETA, SFT = 24, 4, 7, 2.0, 0.3


def make_payload(task: str, seed: int = 0) -> dict:
    """Reference weights and a global batch of PAIRS pairs (winner/loser share noise and t)."""
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.parallel.groups import init_distributed

    arch, g = ARCHS[task], torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_wan(arch, init_distributed())
    weights = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    pairs = []
    for _ in range(PAIRS):
        x0 = torch.randn(2, arch.out_channels, *LATENT, generator=g)
        eps = torch.randn(1, arch.out_channels, *LATENT, generator=g).expand(2, -1, -1, -1, -1)
        sigma = torch.rand(1, generator=g).expand(2)
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * eps
        if arch.image_dim:
            x_t = torch.cat([x_t, torch.randn(1, 20, *LATENT, generator=g).expand(2, -1, -1, -1, -1)], 1)
        pairs.append(dict(
            x=x_t.contiguous(), t=(sigma * 1000).contiguous(), target=(eps - x0).contiguous(),
            text=torch.randn(1, TEXT_LEN, arch.text_dim, generator=g).expand(2, -1, -1).contiguous(),
            image=(torch.randn(1, arch.image_tokens, arch.image_dim, generator=g).expand(2, -1, -1).contiguous()
                   if arch.image_dim else None)))
    return {"task": task, "weights": weights, "pairs": pairs}


def _rank(group) -> int:
    return dist.get_rank(group)


def _size(group) -> int:
    return dist.get_world_size(group)


def _global_names(model) -> dict[str, str]:
    """local parameter name -> global name (pipeline stages number their layers from their offset)."""
    names = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        names[name] = ".".join(parts)
    return names


def _shard(full: torch.Tensor, param, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(_size(tp_group), dim=param.partition_dim)[_rank(tp_group)]


def _unshard(local: torch.Tensor, param, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or _size(tp_group) == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(_size(tp_group))]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def run_case(layout: dict, payload: dict) -> dict:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model, save_model
    from megatron_regdpo.models.wan.build import build_wan
    from megatron_regdpo.objectives.per_sample import sum_across_group
    from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
    from megatron_regdpo.parallel.groups import init_distributed
    from megatron_regdpo.parallel.pipeline import forward_backward

    tp, pp, cp = layout.get("tp", 1), layout.get("pp", 1), layout.get("cp", 1)
    par = SimpleNamespace(tp=tp, pp=pp, cp=cp, sequence_parallel=layout.get("sp", False), virtual_pp=None,
                          distributed_optimizer=layout.get("dist_opt", False), fsdp=layout.get("fsdp", False),
                          grad_reduce_in_fp32=False)
    pg = init_distributed(tp, pp, cp)
    arch = ARCHS[payload["task"]]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_wan(arch, pg, parallel=par, init_weights=False).to(device)
    names = _global_names(model)
    if layout.get("load"):  # a checkpoint written under another layout: dist_checkpointing reshards
        load_model(model, layout["load"])
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(payload["weights"][names[name]], p, pg.tp).to(device))
    if layout.get("save"):
        save_model(model, layout["save"], {"layout": {k: v for k, v in layout.items() if k != "save"}})
    ddp = wrap_data_parallel(model, par, pg)

    dp_rank, dp_size = _rank(pg.dp), _size(pg.dp)
    per_dp = PAIRS // dp_size
    my_pairs = list(range(dp_rank * per_dp, (dp_rank + 1) * per_dp))
    outputs, errs = {}, {}
    cursor = iter(my_pairs)

    def forward_step(data_iterator, chunk):
        pair_id = next(data_iterator)
        b = {k: None if v is None else v.to(device) for k, v in payload["pairs"][pair_id].items()}
        out = chunk(b["x"], b["t"], b["text"], b["image"], return_tokens=True)  # through the DDP wrapper

        def loss_func(out_BSP):
            target = model.cp_chunk(model.patchify(b["target"]))
            sq_sum = sum_across_group((out_BSP.float() - target).pow(2).sum(dim=(1, 2)), pg.cp)
            err = sq_sum / b["target"][0].numel()
            loss = -F.logsigmoid(-BETA * (err[0] - err[1])) + SFT * err[0]
            full = [torch.empty_like(out_BSP) for _ in range(_size(pg.cp))]
            dist.all_gather(full, out_BSP.detach().contiguous(), group=pg.cp)
            outputs[pair_id] = model.unpatchify(torch.cat(full, 1), model.token_grid(b["x"].shape)).cpu()
            errs[pair_id] = err.detach().cpu()
            return loss, {"loss": loss.detach().clone().cpu()}  # the schedule scales `loss` in place

        return out, loss_func

    losses = forward_backward([ddp], forward_step, cursor, num_microbatches=per_dp, tokens=TOKENS,
                              micro_batch_size=2, pg_collection=pg)
    result = {"layout": layout, "outputs": outputs, "errs": errs,
              "losses": {p: l["loss"] for p, l in zip(my_pairs, losses)} if losses else {},
              "coords": {"tp": _rank(pg.tp), "pp": _rank(pg.pp), "cp": _rank(pg.cp), "dp": dp_rank}}
    if not (par.distributed_optimizer or par.fsdp):  # sharded gradients are compared through the step
        result["grads"] = {names[n]: _unshard(p.main_grad, p, pg.tp).cpu() for n, p in model.named_parameters()}
    if layout.get("step"):
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-3, clip_grad=0.0,
                                                     use_distributed_optimizer=par.distributed_optimizer), [ddp],
                                     use_gloo_process_groups=False)
        opt.step()
        result["params"] = {names[n]: _unshard(p, p, pg.tp).cpu() for n, p in model.named_parameters()}
    return result


def run_cases(rank: int, world: int, payload: dict) -> list:
    """Every case of `payload['layouts']` in one spawned world; the worker process entry point."""
    from megatron_regdpo.parallel.groups import destroy_distributed, init_distributed

    init_distributed(rank=rank, world_size=world)
    try:
        return [run_case(layout, payload[layout.get("task", "t2v")]) for layout in payload["layouts"]]
    finally:
        destroy_distributed()
