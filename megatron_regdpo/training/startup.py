"""What a training run prints before step 1: third-party warnings known to be harmless hidden once (with one
line saying so), then a compact summary of what the run is about to do.

HARMLESS is the one list of hidden warnings: the entry point installs it (hide_known_warnings) and the test
suite reuses it (pytest_filterwarnings, tests/conftest.py). Each entry matches a message prefix (regex) AND the
module the warning is attributed to, so the same words from another package, or from our own code, still show.
Set MEGATRON_REGDPO_SHOW_WARNINGS=1 (or pass -W / PYTHONWARNINGS) to see everything.
No torch or megatron import at module level: the filters must be in place before megatron-core is imported.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import NamedTuple

SHOW_ENV = "MEGATRON_REGDPO_SHOW_WARNINGS"


class Harmless(NamedTuple):
    message: str            # regex matched at the start of the message (the warnings module's rule)
    category: type          # warnings: a Warning subclass; None for a logging record
    module: str             # regex for the module the warning is attributed to; for a log, the logger's name
    why: str


HARMLESS: tuple[Harmless, ...] = (
    Harmless(r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core\.",
             "megatron-core on import, once per module, on machines without TE/Apex (CPU, backend=local): "
             "it then uses the torch implementations, which are what backend=local means"),
    Harmless(r"Apex is not installed", UserWarning, r"megatron\.core\.models\.backends",
             "megatron-core's local layer spec falls back to torch's norm, which the local backend expects"),
    Harmless(r"absl\.logging is not installed", UserWarning, r"megatron\.core\.hyper_comm_grid",
             "megatron-core 0.19 logs through the standard logging module instead; nothing is lost"),
    Harmless(r"MimoModelConfig is experimental", UserWarning, r"megatron\.core\.models\.mimo",
             "raised on import by megatron-core's package init (0.19); we do not use MIMO models"),
    Harmless(r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning,
             r"megatron\.core\.inference", "megatron-core's own inference package importing itself; unused here"),
    Harmless(r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config",
             "TransformerConfig's own default cuda_graph_scope triggers it; we capture no CUDA graphs"),
    Harmless(r"If you are using transformer_engine as the transformer implementation, the core_attn",
             UserWarning, r"megatron\.core\.transformer\.transformer_config",
             "a note on every recompute=selective config; config/mcore.py picks core_attn recompute on purpose"),
    Harmless(r"Warning. tp_group is None", DeprecationWarning, r"megatron\.core\.tensor_parallel\.",
             "megatron-core 0.16's own RowParallelLinear.forward passes tp_group=None; the fallback is the "
             "global TP group, which parallel/groups.py sets to the same group"),
    Harmless(r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing\.",
             "megatron-core's dist_checkpointing calls torch DCP's old name; the behaviour is the same"),
    Harmless(r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
             r"torch\.distributed\.checkpoint\.", "megatron-core's dist_checkpointing saves ShardedTensors; "
             "torch still reads and writes them"),
    Harmless(r"The argument order of load has been changed", UserWarning, r"torch\.distributed\.checkpoint\.",
             "raised by torch DCP on every load through megatron-core 0.19, which passes keywords"),
    Harmless(r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning,
             r"torch\.distributed\.checkpoint\.", "a one-process load (the smoke run); with a process "
             "group, as in every training run, torch does not raise it"),
    Harmless(r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit\.",
             "torch's own modules still use it at import; none of ours do"),
    Harmless(r"FSDP2-wrapped module \(FSDPWan(Layer|Model)\) returned a view tensor", UserWarning,
             r"torch\.distributed\.fsdp\.", "a WanLayer passes its context (a view) through; nothing modifies a "
             "layer's outputs in place (megatron-core's block hands them on out of place), and the FSDP2 parity "
             "tests compare every gradient with one rank"),
    Harmless(r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
             r"torch\.distributed\.", "torch 2.13 renamed them (the same collectives); megatron-core, DTensor and "
             "the GPU's torch 2.11 use the old names"),
    Harmless(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
             r"megatron\.core\.optimizer\.", "megatron-core's distributed optimizer probes `.grad` on its shard "
             "views of the weights; their gradients live in its buffers"),
    Harmless(r"MCore's async save is deprecated", None, "megatron.core.dist_checkpointing.strategies.torch",
             "a logger warning by megatron-core 0.19 on every save; our saves are synchronous"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def hide_known_warnings() -> int:
    """Install the HARMLESS filters, unless asked to show everything; how many kinds are hidden (0: shown).
    Silent: the run says so (announce_hidden) once its config is valid, so an error stays one line."""
    if os.environ.get(SHOW_ENV, "") not in ("", "0") or sys.warnoptions:  # a -W / PYTHONWARNINGS choice wins
        return 0
    for h in HARMLESS:
        if h.category is None:
            logger = logging.getLogger(h.module)
            if not any(isinstance(f, _DropHarmless) and f.pattern.pattern == h.message for f in logger.filters):
                logger.addFilter(_DropHarmless(h.message))  # loggers outlive a call (a test calls main twice)
        else:
            warnings.filterwarnings("ignore", message=h.message, category=h.category, module=h.module)
    return len(HARMLESS)


def announce_hidden(hidden: int, rank: int | None = None, stream=None) -> None:
    """The one line (rank 0) saying that `hidden` kinds of warnings are hidden and how to see them."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if hidden and rank == 0:
        print(f"note: {hidden} kinds of known-harmless third-party warnings are hidden "
              f"(megatron_regdpo/training/startup.py says why); {SHOW_ENV}=1 shows them",
              file=stream or sys.stderr, flush=True)


def pytest_filterwarnings() -> list[str]:
    """HARMLESS as pytest `filterwarnings` lines (action:message:category:module); log records are not warnings."""
    lines = []
    for h in HARMLESS:
        if h.category is not None:
            assert ":" not in h.message + h.module, f"pytest splits filters on ':': {h}"
            lines.append(f"ignore:{h.message}:{h.category.__name__}:{h.module}")
    return lines


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count:,} {one if count == 1 else many or one + 's'}"


def bucket_lines(sampler) -> list[str]:
    """Per latent shape: its pairs and how many of them one epoch trains (PairSampler's rules: a partial
    global batch is left out under drop, filled from the same shape under repeat)."""
    g, lines = sampler.global_batch, []
    for shape, n in sorted(sampler.bucket_sizes().items()):
        batches = -(-n // g) if sampler.pad else n // g
        trained = f"all {n}" + (f" (+{batches * g - n} repeated)" if batches * g > n else "") if sampler.pad \
            else f"{batches * g}"
        never = "; smaller than one global batch: never trained" if not batches else ""
        lines.append(f"  {'x'.join(map(str, shape))}: {_n(n, 'pair')}, {trained} trained per epoch "
                     f"({_n(batches, 'batch', 'batches')}){never}")
    return lines


def summary(run) -> str:
    """What the run is about to do, in a stable format: model, parameters, precision, layout, data and its
    buckets, batch and steps, checkpoints, resume point. `run`: a setup.TrainingRun, on the writer rank."""
    import torch.distributed as dist

    from megatron_regdpo.models.wan.arch import resolve_arch

    cfg, p = run.cfg, run.cfg.parallel
    arch = resolve_arch(cfg.model, cfg.checkpoint.load)
    trainable = sum(t.numel() for t in run.model.parameters() if t.requires_grad)
    frozen = sum(t.numel() for t in run.model.parameters() if not t.requires_grad)
    where = " on this rank (a TP/PP shard)" if p.tp * p.pp > 1 else ""
    lora = f"LoRA rank {cfg.lora.rank} alpha {cfg.lora.alpha:g}" if cfg.lora.rank else "full fine-tuning"
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = [name for name, on in (("sequence parallel", p.sequence_parallel), ("distributed optimizer",
             p.distributed_optimizer), ("fsdp", p.fsdp)) if on]
    sampler, held = run.sampler, len(run.eval_ids)
    steps_per_epoch = sampler.steps_per_epoch()
    latest = run.checkpointer.latest() if run.start_step else None
    lines = [
        f"== run {cfg.run.name}",
        f"model     Wan2.1 {cfg.model.size} {arch.task}: {trainable + frozen:,} parameters{where}, "
        f"{trainable:,} trainable, {frozen:,} frozen; {lora}",
        f"precision {cfg.precision.params_dtype}, backend {cfg.model.backend}, fp8 {cfg.precision.fp8}, "
        f"recompute {cfg.model.recompute}, reference {cfg.objective.reference.mode}",
        f"layout    world {world}: tp {p.tp} pp {p.pp} cp {p.cp} dp {run.dp_size}"
        + (f"; {', '.join(flags)}" if flags else ""),
        f"data      {cfg.data.store}: {len(run.dataset)} pairs ({len(run.train_ids)} train, {held} held out)",
        f"buckets   by latent shape (data.small_buckets={cfg.data.small_buckets}):",
        *bucket_lines(sampler),
        f"batch     {_n(cfg.data.global_batch_pairs, 'pair')} per step ({cfg.data.micro_batch_pairs} per micro-batch, "
        f"dp {run.dp_size}); an epoch is {_n(steps_per_epoch, 'step')}",
        f"steps     {cfg.schedule.train_steps} = {cfg.schedule.train_steps / steps_per_epoch:.2f} epochs, "
        f"lr {cfg.optim.lr:g} {cfg.schedule.lr_decay}",
        f"checkpoints {run.checkpointer.root} ("
        + (f"every {cfg.checkpoint.interval} steps" if cfg.checkpoint.interval else "at the end")
        + f", keep {cfg.checkpoint.keep}); metrics {run.run_dir}",
        "start     " + (f"resume from {latest} at step {run.start_step}" if run.start_step else
                         f"fresh, from base weights {cfg.checkpoint.load}" if cfg.checkpoint.load else
                         "fresh, from random weights"),
    ]
    return "\n".join(lines)
