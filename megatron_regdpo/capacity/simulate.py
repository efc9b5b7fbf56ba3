"""One Reg-DPO training step of a configured run, on one rank, with its memory tracked by category.

The step is the trainer's (training/trainer.py), built from the same pieces: build_wan (+ LoRA), the
data-parallel wrapper and optimizer of the config (megatron-core DDP and optimizer, or with parallel.fsdp
FSDP2 and its AdamW, the resident reference sharded like the policy), the configured reference mode,
keyed-noise micro-batches (training/batches.py), the reference pass, the policy forward/backward through
megatron-core's schedule (training/step.py's forward_step, the configured recompute) and the optimizer step. Only the data is synthetic (random latents
of the configured shape instead of a GT-Pair store). With `fake=True` it runs under FakeTensorMode in a fake
world of the configured size (capacity/fake_world.py): nothing is allocated, 14B runs here. With `fake=False`
it runs on real tensors in the caller's process groups: what the planner's validation measures.

Order of what stays resident, as in a run from its second step on: weights, gradient buffers (none with
FSDP2), optimizer state (one warm-up update with zero gradients creates Adam's moments), the reference. Then the step: reference pass, forward/backward, update; its peak is the planner's answer.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext

import torch

from megatron_regdpo.config import validate
from megatron_regdpo.config.mcore import DTYPES
from megatron_regdpo.models.wan.arch import resolve_arch
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.cpu_forms import kernels_as_on_gpu
from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings
from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
from megatron_regdpo.parallel.fsdp2 import frozen_sharding
from megatron_regdpo.parallel.pipeline import forward_backward
from megatron_regdpo.reference import ReferenceBatch, build_reference
from megatron_regdpo.training.batches import micro_batches
from megatron_regdpo.training.optimizer import build_optimizer, optimizer_step
from megatron_regdpo.training.step import make_forward_step, reference_pass

from .fake_world import fake_tensor_mode, fake_world
from .tracker import CATEGORIES, HOST, MemoryTracker


@dataclasses.dataclass
class StepMemory:
    """Bytes on one rank. `static`: resident before the step (weights, grad buffers, optimizer state,
    reference); `breakdown`: by category at the step's peak; `phase_peaks`: highest total per phase, and
    `phase_breakdowns` its categories at that moment."""

    rank: int
    world_size: int
    layout: str
    tokens: int
    peak: int
    peak_phase: str
    breakdown: dict
    phase_peaks: dict
    phase_breakdowns: dict
    static: dict
    host: int                       # host memory before the step (the cpu_swap reference's copy)
    peak_overall: int               # including the build (what a profiler of the whole run sees)
    host_peak: int = 0              # host memory at its highest during the step (+ offloaded activations)
    peak_with_host: int = 0         # device + host at their highest together in the step (one pool on a CPU)
    peak_with_host_overall: int = 0  # the same, including the build
    simulated_as: dict = dataclasses.field(default_factory=dict)   # what ran in place of what was configured
    sizes: dict = dataclasses.field(default_factory=dict)          # per-layer counts for capacity/analytic.py (FP8)
    notes: list = dataclasses.field(default_factory=list)


class _SyntheticPairs:
    """PairDataset's item format with random tensors of the configured shape (no store)."""

    def __init__(self, arch, latent, text_len: int):
        self.arch, self.latent, self.text_len = arch, latent, text_len

    def __getitem__(self, i: int) -> dict:
        a = self.arch
        item = {"pair_id": i, "winner_CFhw": torch.randn(a.out_channels, *self.latent),
                "loser_CFhw": torch.randn(a.out_channels, *self.latent),
                "text_TE": torch.randn(self.text_len, a.text_dim), "text_mask_T": torch.ones(self.text_len, dtype=torch.bool)}
        if a.image_dim is not None:  # I2V: CLIP tokens and mask + first-frame latent channels
            item["image_IE"] = torch.randn(a.image_tokens, a.image_dim)
            item["cond_CFhw"] = torch.randn(a.in_channels - a.out_channels, *self.latent)
        return item


class _CachedErrors:
    """The `cached` mode's device side: precomputed errors looked up per micro-batch, [P] floats each."""

    def begin_step(self):
        pass

    def end_step(self):
        pass

    def __call__(self, batch: ReferenceBatch):
        pairs = batch.target.shape[0] // 2
        return torch.zeros(pairs, device=batch.target.device), torch.zeros(pairs, device=batch.target.device)


def runnable_config(cfg):
    """The config the simulation builds, and what it replaced: Transformer Engine layers run as the local
    spec (same weights; core attention as SDPA, whose memory is FlashAttention's: q, k, v, out and the
    softmax statistics). FSDP2 (parallel.fsdp) runs as configured."""
    # what the trainer refuses, config.validate refuses (simulate_step calls it first), so the planner too
    replaced = {}
    if cfg.model.backend == "te":
        replaced["model.backend"] = "te -> local"
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="local"),
                                  precision=dataclasses.replace(cfg.precision, fp8="none"))
    return cfg, replaced


def simulate_step(cfg, world_size: int, rank: int = 0, *, fake: bool = True, granule: int = 512,
                  pg=None, on_step_start=None, device: str = "cpu", on_built=None) -> StepMemory:
    """Memory of `rank` over one training step of `cfg` (see the module docstring). `pg`: the process
    groups when `fake=False` (the caller's world); a fake world is made when `fake=True`.
    `on_step_start()`: called between the build and the step (a measurement marks the split there).
    `device`: where a real run (fake=False) puts the model and batches, as the trainer does ("cuda" on a GPU).
    `on_built(model)`: called on the policy model once built on `device`, before LoRA: the model is built
    without initialising its weights, so a timed run fills them there (random values, not garbage)."""
    arch = resolve_arch(cfg.model)
    layout = validate(cfg, world_size, arch)
    run_cfg, replaced = runnable_config(cfg)
    device = torch.device(device)
    tracker = MemoryTracker(granule=granule, fake=fake, device_type=device.type)
    world = fake_world(run_cfg.parallel, world_size, rank, seed=cfg.run.seed) if fake else nullcontext(pg)
    # the GPU's kernels, also where the step runs on real CPU tensors (the planner's validation)
    with world as groups, (fake_tensor_mode() if fake else nullcontext()), tracker, kernels_as_on_gpu():
        result = _step(run_cfg, arch, layout, groups, tracker, on_step_start, device, on_built)
    result.rank, result.world_size, result.simulated_as = rank, world_size, replaced
    return result


def _step(cfg, arch, layout, pg, tracker: MemoryTracker, on_step_start=None, device=torch.device("cpu"),
          on_built=None) -> StepMemory:
    dtype = DTYPES[cfg.precision.params_dtype]
    mode = cfg.objective.reference.mode

    def build_base(init: bool = False, policy: bool = False):
        return build_wan(arch, pg, parallel=cfg.parallel, params_dtype=dtype, fp8=cfg.precision.fp8,
                         backend=cfg.model.backend, recompute=cfg.model.recompute, init_weights=init,
                         offload_activations=policy and cfg.model.offload_activations).to(device)

    with tracker.stage("build", "weights"):
        model = build_base(policy=True)
        offload = model.activation_offload
        if offload is not None:  # offloaded activations are host memory, measured as allocated
            offload.host_allocation = lambda: tracker.stage(tracker.phase, HOST)
        if on_built is not None:
            on_built(model)
        if cfg.lora.rank > 0:
            from megatron_regdpo.models.lora import apply_lora

            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
    with tracker.stage("build", "grads"):
        ddp = wrap_data_parallel(model, cfg.parallel, pg)
    # with the distributed optimizer, DDP moves the parameters into one contiguous buffer, and FSDP2 replaces
    # them by their shards: still weights
    tracker.move(list(model.parameters()), "weights")
    with tracker.stage("build", "optimizer"):
        optimizer = build_optimizer(cfg.optim, cfg.parallel, dtype, [ddp], pg)
        ddp.zero_grad_buffer()
        if cfg.parallel.fsdp:  # FSDP2 keeps no gradient buffer: torch's AdamW makes state for gradients only
            for p in optimizer.get_parameters():
                p.grad = torch.zeros_like(p)
        optimizer_step(optimizer, 0.0, cfg.optim.clip_grad)   # Adam's moments exist from the second step on
        optimizer.zero_grad()
    with tracker.stage("build", "reference"):
        if mode == "cached":
            reference = _CachedErrors()
        else:
            reference = build_reference(mode, ddp, build_model=build_base, cp_group=pg.cp,
                                        shard=frozen_sharding(cfg.parallel, pg, dtype))
        if mode == "cpu_swap":
            tracker.move(reference.host_copies, HOST)
    static = {c: tracker.current[c] for c in (*CATEGORIES, HOST)}
    sizes = layer_sizes(model, grad_bytes=4 if cfg.parallel.grad_reduce_in_fp32 else dtype.itemsize)
    tracker.reset_peak()
    if on_step_start is not None:
        on_step_start()

    per_rank = cfg.data.global_batch_pairs // layout.dp
    per_micro = cfg.data.micro_batch_pairs
    fm = FlowMatchingSettings(shift=cfg.objective.shift, timestep_sampling=cfg.objective.timestep_sampling)
    with tracker.stage("data", "activations"):
        mbs = micro_batches(_SyntheticPairs(arch, layout.latent_shape, cfg.data.text_len), list(range(per_rank)),
                            per_micro, seed=cfg.run.seed, step=0, fm=fm, device=device, dtype=dtype)
    with tracker.stage("reference", "reference"):
        reference_pass(reference, mbs, lambda mb: ReferenceBatch(
            x_t=mb["x_t"], timestep=mb["timestep"], text=mb["text"], target=mb["target"], image=mb["image"]))
    settings = RegDPOSettings(cfg.objective.beta, cfg.objective.beta_convention, cfg.objective.dpo_weight,
                              cfg.objective.sft_mode, cfg.objective.sft_weight)
    with tracker.stage("forward_backward", "activations"), _fsdp2_grads_counted_as_grads(tracker):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_step = make_forward_step(settings, pg.cp, pair_forward=cfg.objective.pair_forward)
        forward_backward([ddp], forward_step, iter(mbs), num_microbatches=len(mbs), tokens=layout.tokens,
                         micro_batch_size=2 * per_micro, pg_collection=pg)
    del mbs
    with tracker.stage("optimizer", "optimizer"):
        optimizer_step(optimizer, 0.0, cfg.optim.clip_grad)
    describe = layout.describe().splitlines()[0]
    return StepMemory(rank=0, world_size=layout.world_size, layout=describe, tokens=layout.tokens,
                      peak=tracker.peak, peak_phase=tracker.peak_phase, breakdown=dict(tracker.peak_breakdown),
                      phase_peaks=dict(tracker.phase_peaks), phase_breakdowns=dict(tracker.phase_breakdowns),
                      static=static, host=static[HOST], peak_overall=tracker.peak_overall, sizes=sizes,
                      # on a GPU the tracker sees device storages only: the offloader counts its own host bytes
                      host_peak=tracker.peak_host + (offload.peak_host_bytes if offload and device.type != "cpu"
                                                     else 0),
                      peak_with_host=tracker.peak_with_host, peak_with_host_overall=tracker.peak_with_host_overall)


@contextmanager
def _fsdp2_grads_counted_as_grads(tracker: MemoryTracker):
    """FSDP2 keeps no gradient buffer: a unit's sharded gradients are made in its post-backward (the
    reduce-scatter's input and output buffers and the new `.grad` shards). Counted as grads, not activations.
    The hook point is torch's (private) FSDPParamGroup.post_backward, wrapped only while the step runs: the
    public API has no per-unit post-backward callback, and the memory is the same without it (only its label)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    real = FSDPParamGroup.post_backward

    def post_backward(self, *args, **kwargs):
        with tracker.stage(tracker.phase, "grads"):
            return real(self, *args, **kwargs)

    FSDPParamGroup.post_backward = post_backward
    try:
        yield
    finally:
        FSDPParamGroup.post_backward = real


def layer_sizes(model, grad_bytes: int) -> dict:
    """This rank's largest WanLayer: weight bytes, trainable-gradient bytes, TP-linear weight elements."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_regdpo.models.wan.layer import WanLayer

    out = {"layer_weight_bytes": 0, "layer_grad_bytes": 0, "layer_linear_params": 0}
    for layer in (m for m in model.modules() if isinstance(m, WanLayer)):
        params = list(layer.parameters())
        linears = [m for m in layer.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
        sizes = {"layer_weight_bytes": sum(p.numel() * p.element_size() for p in params),
                 "layer_grad_bytes": sum(p.numel() * grad_bytes for p in params if p.requires_grad),
                 "layer_linear_params": sum(m.weight.numel() for m in linears)}
        out = {k: max(out[k], v) for k, v in sizes.items()}
    return out
