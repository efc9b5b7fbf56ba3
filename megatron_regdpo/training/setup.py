"""Builds a TrainingRun from the config: groups, model (+ base weights, + LoRA), DDP, optimizer,
reference, data, checkpointer (resuming from `latest`). The only place that knows model, method and data."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_regdpo.checkpoint_io.megatron_ckpt import load_model
from megatron_regdpo.config import ConfigError, validate, video_tokens
from megatron_regdpo.config.mcore import DTYPES
from megatron_regdpo.data.pairs import PairDataset
from megatron_regdpo.data.prefetch import Prefetcher
from megatron_regdpo.data.sampler import GlobalBatchChanged, PairSampler
from megatron_regdpo.models.wan.arch import resolve_arch
from megatron_regdpo.models.wan.build import build_wan
from megatron_regdpo.models.wan.convert import FAMILY
from megatron_regdpo.models.wan.flops import wan_step_flops
from megatron_regdpo.objectives.flow_matching import FlowMatchingSettings
from megatron_regdpo.objectives.reg_dpo import RegDPOSettings
from megatron_regdpo.parallel.data_parallel import wrap_data_parallel
from megatron_regdpo.parallel.fsdp2 import frozen_sharding
from megatron_regdpo.reference import ReferenceBatch, build_reference

from .checkpoint import Checkpointer
from .consistency import (InputMismatch, batch_size_errors, reference_cache_errors, resume_mismatch,
                          small_bucket_errors, store_errors)
from .optimizer import build_optimizer


@dataclasses.dataclass
class TrainingRun:
    cfg: object
    pg: object
    model: torch.nn.Module          # this rank's WanModel (unwrapped)
    model_chunks: list              # [DDP(model)]
    optimizer: object
    reference: object
    dataset: Prefetcher             # the PairDataset, reading the next step's pairs ahead (data.prefetch)
    sampler: object
    checkpointer: Checkpointer
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    tokens: int
    dp_size: int
    settings: RegDPOSettings
    flow_matching: FlowMatchingSettings
    step_flops: dict = dataclasses.field(default_factory=dict)  # models/wan/flops.py: model / hardware
    train_ids: list = dataclasses.field(default_factory=list)   # sampler index -> pair id
    eval_ids: list = dataclasses.field(default_factory=list)    # held-out pair ids
    start_step: int = 0
    skipped_total: int = 0
    prefetch: bool = False                                        # data.prefetch resolved for this device
    _ids: object = None

    def next_pair_ids(self) -> list[int]:
        for _ in range(2):  # the sampler's iterator ends with its epoch; the next one starts the next epoch
            if self._ids is None:
                self._ids = iter(self.sampler)
            try:
                return [self.train_ids[i] for i in next(self._ids)]
            except StopIteration:
                self._ids = None
        raise RuntimeError("the sampler yields no batches")

    def peek_pair_ids(self) -> list[int]:
        """The pair ids next_pair_ids returns next; the sampler's position (what a checkpoint saves) stays."""
        return [self.train_ids[i] for i in self.sampler.peek()]

    def reference_batch(self, mb: dict) -> ReferenceBatch:
        return ReferenceBatch(x_t=mb["x_t"], timestep=mb["timestep"], text=mb["text"], target=mb["target"],
                              image=mb["image"], pair_ids=tuple(mb["pair_ids"]), seed=self.cfg.run.seed,
                              step=mb["noise_step"], draw=mb["draw"])

    def mean_loss(self, losses: list[dict]) -> float:
        """The step's loss on every rank: the last stage's mean over micro-batches, averaged over DP."""
        local = torch.tensor([sum(float(l["loss"]) for l in losses) / len(losses) if losses else 0.0],
                             dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(local, group=self.pg.pp)             # only the last stage holds it
            dist.all_reduce(local, group=self.pg.dp)
            local /= dist.get_world_size(self.pg.dp)
        return float(local.item())

    def checkpoint_due(self, step: int) -> bool:
        return self.cfg.checkpoint.interval > 0 and step % self.cfg.checkpoint.interval == 0

    def save(self, step: int) -> Path:
        self.dataset.settle()   # no read of the next step's pairs runs while the save forks its writers
        return self.checkpointer.save(step, self.model_chunks, self.optimizer,
                                      {"sampler": self.sampler.state_dict(), "skipped_total": self.skipped_total})


def build_run(cfg, pg) -> TrainingRun:
    arch = resolve_arch(cfg.model, cfg.checkpoint.load)  # the recipe's architecture is the checkpoint's
    dtype = DTYPES[cfg.precision.params_dtype]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.data.store is None:
        raise ConfigError("data.store is not set: point it at a GT-Pair store (tools/preprocess_videos.py, "
                          "tools/make_gt_pairs.py)")
    # every refusal of the config itself is config.validate's, which the capacity planner calls too (train.main
    # has called it already; a caller that did not gets the same one-line errors here)
    validate(cfg, dist.get_world_size(), arch)
    # data, sampler and reference cache first: every mismatch with the recipe is found before any model is built
    if not Path(cfg.data.store).exists():  # (validate() says so first; the folder may go away in between)
        raise FileNotFoundError(f"data.store={cfg.data.store} does not exist")
    try:
        dataset = PairDataset(cfg.data.store)
    except ValueError as e:  # not a GT-Pair store, or one without pairs: the store's message says which
        raise InputMismatch(f"data.store={cfg.data.store}: {e}") from e
    dp_size, dp_rank = dist.get_world_size(pg.dp), dist.get_rank(pg.dp)
    per_rank = cfg.data.global_batch_pairs // dp_size
    hold = cfg.eval.holdout_pairs
    if hold >= len(dataset):
        raise InputMismatch(f"eval.holdout_pairs={hold} leaves nothing to train on: {cfg.data.store} has "
                             f"{len(dataset)} pairs")
    train_ids, eval_ids = list(range(len(dataset) - hold)), list(range(len(dataset) - hold, len(dataset)))
    shapes = dataset.shapes()
    errors = store_errors(cfg, arch, cfg.data.store, dataset.store.attrs, shapes)
    fm = FlowMatchingSettings(shift=cfg.objective.shift, timestep_sampling=cfg.objective.timestep_sampling)
    cache_path = Path(cfg.data.store) / "reference_cache"
    if cfg.objective.reference.mode == "cached":
        errors += reference_cache_errors(cfg, cache_path, fm, dtype)
    too_big = batch_size_errors(cfg, [shapes[i] for i in train_ids], cfg.data.store, hold)
    if too_big:  # the sampler refuses a batch that no bucket fills: say it in the recipe's terms first
        raise InputMismatch(errors + too_big)
    small = "drop" if cfg.data.small_buckets == "error" else cfg.data.small_buckets
    sampler = PairSampler([shapes[i] for i in train_ids], per_rank, dp_rank, dp_size, seed=cfg.run.seed,
                          small_buckets=small)
    errors += small_bucket_errors(cfg, sampler, cfg.data.store, rank0=dist.get_rank() == 0)
    if errors:
        raise InputMismatch(errors)

    def build_base(init: bool, policy: bool = False) -> torch.nn.Module:
        return build_wan(arch, pg, parallel=cfg.parallel, params_dtype=dtype, fp8=cfg.precision.fp8,
                         backend=cfg.model.backend, recompute=cfg.model.recompute, init_weights=init,
                         offload_activations=policy and cfg.model.offload_activations).to(device)

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every run of this config
    model = build_base(init=cfg.checkpoint.load is None, policy=True)
    if cfg.checkpoint.load is not None:
        load_model(model, cfg.checkpoint.load)                      # the base (pretrained) weights
    if cfg.lora.rank > 0:
        from megatron_regdpo.models.lora import apply_lora

        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
    ddp = wrap_data_parallel(model, cfg.parallel, pg)
    optimizer = build_optimizer(cfg.optim, cfg.parallel, dtype, [ddp], pg)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name

    reference = build_reference(
        cfg.objective.reference.mode, ddp, build_model=lambda: build_base(init=False), checkpoint=cfg.checkpoint.load,
        cp_group=pg.cp, cache_path=cache_path, expect={"seed": cfg.run.seed, "flow_matching": fm},
        shard=frozen_sharding(cfg.parallel, pg, dtype))  # a resident reference sharded like the policy
    tokens, latent = video_tokens(cfg.data.frames, cfg.data.height, cfg.data.width)
    step_flops = wan_step_flops(arch, latent, cfg.data.text_len, pairs=cfg.data.global_batch_pairs,
                                reference_forward=cfg.objective.reference.mode != "cached",
                                recompute=cfg.model.recompute)
    run = TrainingRun(
        cfg=cfg, pg=pg, model=model, model_chunks=[ddp], optimizer=optimizer, reference=reference,
        dataset=Prefetcher(dataset),
        sampler=sampler, checkpointer=Checkpointer(
            Path(cfg.checkpoint.dir or run_dir / "checkpoints"), cfg.checkpoint.keep, pg=pg, seed=cfg.run.seed,
            meta={"family": FAMILY, "arch": dataclasses.asdict(arch), "dtype": str(dtype),
                  "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
                  if cfg.lora.rank > 0 else None}),
        run_dir=run_dir, device=device, dtype=dtype, tokens=tokens, dp_size=dp_size,
        settings=RegDPOSettings(cfg.objective.beta, cfg.objective.beta_convention, cfg.objective.dpo_weight,
                                cfg.objective.sft_mode, cfg.objective.sft_weight),
        flow_matching=fm, train_ids=train_ids, eval_ids=eval_ids, step_flops=step_flops,
        prefetch=cfg.data.prefetch if cfg.data.prefetch is not None else device.type == "cuda")
    latest = run.checkpointer.latest()
    if latest is not None:
        state = run.checkpointer.load(latest, run.model_chunks, optimizer)
        run.start_step, run.skipped_total = int(state["step"]), int(state.get("skipped_total", 0))
        try:
            sampler.load_state_dict(state["sampler"])
        except GlobalBatchChanged as e:  # another DP size is fine, another global batch would reorder the data
            raise InputMismatch(f"{latest} cannot resume with data.global_batch_pairs="
                                f"{cfg.data.global_batch_pairs}: {e}") from e
        except ValueError as e:  # the store grew or shrank since the checkpoint (or seed / small_buckets changed)
            raise resume_mismatch(latest, cfg.data.store, str(e)) from e
    return run
