"""The typed, frozen configuration tree.

Every knob of a run lives here with its default. Recipes (YAML) only name what
differs from these defaults; `loader.py` turns them into this tree strictly and
`validate.py` holds every check that spans more than one field.

Pure python on purpose: importing the config must not pull in torch/megatron.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad recipe, override or field combination. `errors` holds one line per problem."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class _Section:
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists, so the result can go straight to yaml.safe_dump
        and back through the loader unchanged."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RunConfig(_Section):
    name: str
    seed: int = 1234
    output_dir: str = "runs"


@dataclass(frozen=True)
class ModelConfig(_Section):
    # from_checkpoint: exactly the architecture recorded in the checkpoint's model.json (below)
    size: Literal["debug", "1.3B", "14B", "14B-i2v", "from_checkpoint"]
    # The checkpoint folder whose model.json a from_checkpoint size reads; the loader fills in checkpoint.load
    arch_from: str | None = None
    backend: Literal["local", "te"] = "local"
    # Optional overrides of the named size's architecture; None = take the named size's value.
    num_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    text_dim: int | None = None
    image_dim: int | None = None
    freq_dim: int | None = None
    task: Literal["t2v", "i2v"] | None = None
    recompute: Literal["none", "selective", "full"] = "none"
    # full recompute only: each layer's saved input goes to (pinned) host memory in the forward and comes back
    # for its recompute (parallel/offload.py); bitwise the same step, the device keeps one layer's activations
    offload_activations: bool = False


@dataclass(frozen=True)
class ParallelConfig(_Section):
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    virtual_pp: int | None = None
    distributed_optimizer: bool = False
    fsdp: bool = False
    grad_reduce_in_fp32: bool = False
    cp_comm: Literal["all_gather", "a2a", "p2p"] = "all_gather"


@dataclass(frozen=True)
class PrecisionConfig(_Section):
    params_dtype: Literal["fp32", "bf16"] = "bf16"
    fp8: Literal["none", "delayed", "current"] = "none"


@dataclass(frozen=True)
class DataConfig(_Section):
    store: str | None = None
    frames: int = 81  # video frames per clip; the Wan VAE needs 4k+1
    height: int = 480  # pixels
    width: int = 832  # pixels
    fps: int = 16
    text_len: int = 512
    micro_batch_pairs: int = 1  # one pair = (preferred, rejected) clip for the same prompt
    global_batch_pairs: int = 8
    # a latent-shape bucket with fewer pairs than one global batch: error (at start, naming them), drop (never
    # train them), repeat (fill every shape's last batch with its own pairs: every pair trains every epoch)
    small_buckets: Literal["error", "drop", "repeat"] = "error"
    # read the next step's pairs from the store in a background thread while this step computes (same batches);
    # null: on when training on a GPU (on a CPU the reader competes with the step for cores and the GIL)
    prefetch: bool | None = None


@dataclass(frozen=True)
class ReferenceConfig(_Section):
    """Where the frozen reference policy of DPO comes from."""

    mode: Literal["lora_base", "resident", "cpu_swap", "cached"] = "resident"


@dataclass(frozen=True)
class ObjectiveConfig(_Section):
    beta: float = 500.0
    beta_convention: Literal["diffusion_dpo", "raw"] = "diffusion_dpo"
    dpo_weight: float = 1.0
    sft_mode: Literal["dgr", "constant", "dgr_scaled"] = "dgr"
    sft_weight: float = 1.0
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    shift: float = 5.0
    # joint: winner and loser stacked in one forward (the paper's memory saving); separate: two forwards
    # (batch halves) whose outputs meet at the loss, as a naive Diffusion-DPO port does
    pair_forward: Literal["joint", "separate"] = "joint"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


@dataclass(frozen=True)
class LoraConfig(_Section):
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 32.0
    targets: tuple[str, ...] = (
        "linear_qkv", "linear_proj", "linear_q", "linear_kv", "linear_kv_img", "linear_fc1", "linear_fc2",
    )  # every attention and FFN linear (the paper); linear_kv_img exists only in I2V models


@dataclass(frozen=True)
class OptimConfig(_Section):
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    max_skipped_steps: int = 5  # abort after this many non-finite steps in a row


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    train_steps: int = 100
    warmup_steps: int = 0
    lr_decay: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    dir: str | None = None
    interval: int = 0  # 0 = only at the end
    keep: int = 2
    load: str | None = None
    async_save: bool = False


@dataclass(frozen=True)
class LoggingConfig(_Section):
    interval: int = 1
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False


@dataclass(frozen=True)
class EvalVideosConfig(_Section):
    """Validation videos (training/eval_videos.py): policy and reference sampled from the same noise."""

    count: int = 0                   # videos per evaluation; 0 = none
    interval: int = 0                # steps between them; 0 = eval.interval
    prompts_file: str | None = None  # T2V: one prompt per line; None = the first `count` held-out clips
    steps: int = 20                  # solver steps (Wan's pipelines default to 50)
    guidance: float = 5.0            # classifier-free guidance; <= 1 = conditional pass only
    solver: Literal["unipc", "euler"] = "unipc"
    shift: float = 5.0               # the sampler's flow shift (Wan2.1: 5.0 at 720p, 3.0 at 480p)
    reference: bool = True           # sample the reference beside the policy
    # the flow-matching error of policy and reference on the held-out real clips at these noise levels
    # (sigma in (0, 1)); empty = not computed
    fm_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class EvalConfig(_Section):
    interval: int = 0        # steps between evaluations; 0 = never
    holdout_pairs: int = 0   # the last N pairs of the store's pair index, never trained on
    videos: EvalVideosConfig = field(default_factory=EvalVideosConfig)
    clip: str | None = None  # a local CLIP folder (CLIPModel + its processor): CLIP text-video score of the videos


@dataclass(frozen=True)
class Config(_Section):
    run: RunConfig
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
