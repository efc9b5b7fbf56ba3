"""Every check that spans more than one field, in one place.

`validate` runs them all and reports every failure together (one line each), so
fixing a recipe for a new cluster shape is one round trip, not five. It returns
the derived parallel `Layout` that the rest of the stack builds from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .schema import Config, ConfigError
from .te_shapes import te_shape_errors

# Wan2.1 geometry: the VAE compresses time by 4 (keeping the first frame) and space
# by 8; the DiT then patchifies latents with a (1, 2, 2) patch.
VAE_STRIDE_T, VAE_STRIDE_HW, PATCH_HW = 4, 8, 2


class ArchLike(Protocol):
    num_layers: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    virtual_pp: int | None
    layers_per_stage: tuple[int, ...]  # empty when validated without an architecture
    tokens: int  # video tokens per clip, before CP sharding
    latent_shape: tuple[int, int, int]  # (frames, height, width) of the VAE latent

    def describe(self) -> str:
        lines = [
            f"TP={self.tp} PP={self.pp} CP={self.cp} DP={self.dp} (world {self.world_size})"
            + (", sequence parallel" if self.sequence_parallel else ""),
            f"latent {'x'.join(map(str, self.latent_shape))} -> {self.tokens} tokens/clip,"
            f" {self.tokens // self.cp} per CP rank",
        ]
        if not self.layers_per_stage:
            return "\n".join(lines)
        chunks = self.virtual_pp or 1
        per_chunk = self.layers_per_stage[0] // chunks
        for stage in range(self.pp):
            # Megatron's interleaved schedule: chunk v of stage p holds model chunk v*pp + p.
            spans = [(v * self.pp + stage) * per_chunk for v in range(chunks)]
            ranges = ", ".join(f"{start}-{start + per_chunk - 1}" for start in spans)
            lines.append(f"stage {stage}: layers {ranges}")
        return "\n".join(lines)


def video_tokens(frames: int, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
    """Tokens per clip and latent (f, h, w) for a pixel-space clip; assumes valid geometry."""
    latent = ((frames - 1) // VAE_STRIDE_T + 1, height // VAE_STRIDE_HW, width // VAE_STRIDE_HW)
    return latent[0] * (latent[1] // PATCH_HW) * (latent[2] // PATCH_HW), latent


def eval_videos_errors(cfg: Config) -> list[str]:
    """eval.videos and eval.clip (training/eval_videos.py)."""
    ev, vid = cfg.eval, cfg.eval.videos
    errors: list[str] = []
    if vid.count < 0 or vid.interval < 0 or vid.steps < 1:
        errors.append(f"eval.videos.count={vid.count} and .interval={vid.interval} must be >= 0, "
                      f".steps={vid.steps} >= 1")
    if any(not 0 < s < 1 for s in vid.fm_sigmas):
        errors.append(f"eval.videos.fm_sigmas={list(vid.fm_sigmas)}: every noise level must be in (0, 1)")
    if vid.shift <= 0:
        errors.append(f"eval.videos.shift must be > 0, got {vid.shift}")
    if ev.clip is not None and not Path(ev.clip).is_dir():
        errors.append(f"eval.clip={ev.clip} is not a folder (want a local CLIPModel folder with its processor)")
    if vid.count <= 0:
        return errors
    if (vid.interval or ev.interval) <= 0:
        errors.append(f"eval.videos.count={vid.count} needs a step interval: eval.videos.interval or "
                      f"eval.interval > 0 (both are 0)")
    if vid.prompts_file is None and ev.holdout_pairs == 0:
        errors.append(f"eval.videos.count={vid.count} samples held-out clips (eval.videos.prompts_file is "
                      f"null): set eval.holdout_pairs > 0, or give a prompts file")
    if vid.prompts_file is not None and not Path(vid.prompts_file).is_file():
        errors.append(f"eval.videos.prompts_file={vid.prompts_file} does not exist")
    if cfg.parallel.pp > 1:
        errors.append(f"eval.videos needs parallel.pp=1 (got pp={cfg.parallel.pp}): the sampler runs "
                      f"2 x eval.videos.steps forwards of the whole model in sequence on each replica; "
                      f"sample the checkpoints offline with tools/sample_videos.py, or set eval.videos.count=0")
    if vid.reference and cfg.objective.reference.mode == "cached" and cfg.lora.rank == 0:
        errors.append("eval.videos.reference=true: objective.reference.mode='cached' keeps no reference model "
                      "in a full fine-tune (lora.rank=0); set eval.videos.reference=false or sample the base "
                      "offline with tools/sample_videos.py --reference BASE_CKPT")
    return errors


def validate(cfg: Config, world_size: int, arch: ArchLike | None = None) -> Layout:
    """Check `cfg` against the world size (and the resolved architecture, when given).

    Raises one ConfigError listing every failed check; otherwise returns the Layout.
    """
    errors: list[str] = []
    par, data = cfg.parallel, cfg.data
    tp, pp, cp, vpp = par.tp, par.pp, par.cp, par.virtual_pp

    # --- parallel grid
    dp = 0
    if world_size < 1:
        errors.append(f"world size must be >= 1, got {world_size}")
    for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
        if size < 1:
            errors.append(f"parallel.{name} must be >= 1, got {size}")
    if world_size >= 1 and min(tp, pp, cp) >= 1:
        if world_size % (tp * pp * cp):
            errors.append(f"world size {world_size} is not divisible by tp*pp*cp = {tp * pp * cp}"
                          f" (tp={tp}, pp={pp}, cp={cp})")
        else:
            dp = world_size // (tp * pp * cp)
    if par.sequence_parallel and tp <= 1:
        errors.append(f"parallel.sequence_parallel requires parallel.tp > 1, got tp={tp}")
    if vpp is not None:  # (Layout and describe() keep the interleaved split for when the trainer runs it)
        errors.append(f"parallel.virtual_pp={vpp} is not supported: the trainer builds one model chunk per "
                      f"pipeline stage, not the interleaved schedule's virtual stages (docs/architecture.md); unset it")

    if cfg.model.offload_activations and cfg.model.recompute != "full":
        errors.append(f"model.offload_activations needs model.recompute=full (it offloads the layer inputs that "
                      f"full recompute keeps), got model.recompute={cfg.model.recompute}")

    # --- architecture split
    layers_per_stage: tuple[int, ...] = ()
    if arch is not None and tp >= 1 and pp >= 1:
        if arch.num_heads % tp:
            errors.append(f"model heads {arch.num_heads} not divisible by parallel.tp={tp}")
        if arch.num_layers % pp:
            errors.append(f"model layers {arch.num_layers} not divisible by parallel.pp={pp}")
        else:
            layers_per_stage = (arch.num_layers // pp,) * pp

    # --- video geometry -> sequence length
    tokens, latent = 0, (0, 0, 0)
    geometry_ok = split_ok = True
    if data.frames < 1 or data.frames % VAE_STRIDE_T != 1:
        errors.append(f"data.frames={data.frames} must be 4k+1 (Wan VAE keeps the first frame"
                      f" and compresses time by {VAE_STRIDE_T}), e.g. {max(1, data.frames // 4 * 4 + 1)}")
        geometry_ok = False
    for name, px in (("height", data.height), ("width", data.width)):
        if px < 1 or px % (VAE_STRIDE_HW * PATCH_HW):
            errors.append(f"data.{name}={px} must be a positive multiple of 16"
                          f" (VAE stride {VAE_STRIDE_HW} x patch {PATCH_HW})")
            geometry_ok = False
    if geometry_ok:
        tokens, latent = video_tokens(data.frames, data.height, data.width)
        how = (f"{tokens} = {latent[0]} latent frames x {latent[1] // PATCH_HW} x {latent[2] // PATCH_HW}"
               f" patches from data.frames={data.frames}, height={data.height}, width={data.width}")
        if cp >= 1 and tokens % cp:
            errors.append(f"video tokens {how} not divisible by parallel.cp={cp}")
            split_ok = False
        elif par.sequence_parallel and tp >= 1 and cp >= 1 and tokens % (tp * cp):
            errors.append(f"video tokens {how} not divisible by tp*cp = {tp * cp}"
                          f" (sequence parallel shards each CP chunk over tp={tp})")
            split_ok = False

    # --- batch
    micro, global_ = data.micro_batch_pairs, data.global_batch_pairs
    if micro < 1 or global_ < 1:
        errors.append(f"data.micro_batch_pairs={micro} and data.global_batch_pairs={global_} must be >= 1")
    elif dp and global_ % (dp * micro):
        errors.append(f"data.global_batch_pairs={global_} not divisible by dp * micro_batch_pairs"
                      f" = {dp * micro} (dp={dp}, micro={micro})")

    # --- precision and sharding
    prec = cfg.precision
    if prec.fp8 != "none" and (cfg.model.backend != "te" or prec.params_dtype != "bf16"):
        errors.append(f"precision.fp8={prec.fp8!r} requires model.backend='te' and params_dtype='bf16'"
                      f" (got backend={cfg.model.backend!r}, params_dtype={prec.params_dtype!r})")
    if geometry_ok and split_ok and min(tp, cp, micro) >= 1:  # Transformer Engine's FP8 GEMM and CP shapes
        errors += te_shape_errors(cfg, arch, tokens, latent[0], dp)
    if par.fsdp and cfg.objective.reference.mode == "cpu_swap":
        errors.append("objective.reference.mode='cpu_swap' swaps whole weights, parallel.fsdp shards them: use "
                      "'resident' (sharded like the policy) or 'lora_base'/'cached'")
    if par.fsdp and par.distributed_optimizer:
        errors.append("parallel.fsdp and parallel.distributed_optimizer are mutually exclusive"
                      " (FSDP already shards optimizer state)")

    # --- LoRA, objective, optimizer, schedule, checkpoint
    lora = cfg.lora
    if lora.rank < 0:
        errors.append(f"lora.rank must be >= 0 (0 = full fine-tuning), got {lora.rank}")
    if lora.rank > 0 and lora.alpha <= 0:
        errors.append(f"lora.alpha must be > 0 when lora.rank > 0, got alpha={lora.alpha}")
    if cfg.objective.reference.mode == "lora_base" and lora.rank <= 0:
        errors.append(f"objective.reference.mode='lora_base' needs LoRA (lora.rank > 0), got rank={lora.rank}")
    if cfg.objective.pair_forward == "separate" and pp != 1:
        errors.append(f"objective.pair_forward='separate' needs parallel.pp=1 (a pipeline stage passes one "
                      f"tensor per micro-batch), got pp={pp}")
    if cfg.objective.beta <= 0:
        errors.append(f"objective.beta must be > 0, got {cfg.objective.beta}")
    if cfg.eval.interval < 0 or cfg.eval.holdout_pairs < 0:
        errors.append(f"eval.interval and eval.holdout_pairs must be >= 0, got {cfg.eval.interval}, "
                      f"{cfg.eval.holdout_pairs}")
    if cfg.eval.interval > 0 and cfg.eval.holdout_pairs == 0:
        errors.append(f"eval.interval={cfg.eval.interval} needs held-out pairs (eval.holdout_pairs > 0)")
    errors += eval_videos_errors(cfg)
    if cfg.logging.interval < 1:
        errors.append(f"logging.interval must be >= 1, got {cfg.logging.interval}")
    if cfg.objective.sft_mode == "dgr" and cfg.objective.sft_weight != 1.0:
        errors.append(f"objective.sft_weight={cfg.objective.sft_weight} has no effect with sft_mode='dgr' "
                      f"(r = DGR); use sft_mode='dgr_scaled' to scale the DGR")
    if cfg.model.backend == "local" and cfg.parallel.cp > 1 and cfg.parallel.cp_comm != "all_gather":
        errors.append(f"parallel.cp_comm={cfg.parallel.cp_comm!r} needs model.backend='te'; "
                      f"the local backend implements context parallelism with all_gather")
    if cfg.optim.lr <= 0:
        errors.append(f"optim.lr must be > 0, got {cfg.optim.lr}")
    sched = cfg.schedule
    if sched.warmup_steps > sched.train_steps:
        errors.append(f"schedule.warmup_steps={sched.warmup_steps} exceeds train_steps={sched.train_steps}")
    if cfg.checkpoint.keep < 1:
        errors.append(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    if cfg.checkpoint.async_save:
        errors.append("checkpoint.async_save=true is not supported yet: saves are synchronous (and atomic)")

    # --- paths: a typo'd store would otherwise pass --dry-run and fail on every rank after launch. A dry run
    # on a machine that cannot see the store says so too: data.store=null validates the layout alone there.
    if data.store is not None and not Path(data.store).exists():
        errors.append(f"data.store={data.store} does not exist (a typo? where the store is not mounted, "
                      f"validate the layout alone with data.store=null)")

    if errors:
        raise ConfigError(errors)
    return Layout(world_size, tp, pp, cp, dp, par.sequence_parallel, vpp,
                  layers_per_stage, tokens, latent)
