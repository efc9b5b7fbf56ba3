"""A whole diffusers Wan pipeline out of a Megatron checkpoint: our transformer + the base pipeline's rest.

The base folder is the diffusers pipeline the checkpoint was trained from (e.g. a local copy of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers): its VAE, text encoder, tokenizer, scheduler (and, for I2V, image encoder
and image processor) are copied or linked; the transformer is the checkpoint's (adapters merged). It is
refused, before anything is written, when it is not the same kind of pipeline as the checkpoint (T2V vs
I2V) or its transformer config differs from the checkpoint's architecture: the VAE and text encoder of
another Wan would load without complaint and give wrong videos.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from megatron_regdpo.checkpoint_io.megatron_ckpt import read_meta
from megatron_regdpo.checkpoint_io.pipeline_folder import INDEX_FILE, assemble_pipeline, components, read_pipeline_index

from .arch import WanArch
from .convert import arch_from_meta, export_diffusers

PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}
TRANSFORMER = ("diffusers", "WanTransformer3DModel")


def transformer_config_differences(config: dict, arch: WanArch) -> list[tuple[str, object, object]]:
    """(key, base's value, ours) for each WanTransformer3DModel argument on which `config` and `arch` differ;
    a key the config leaves out has diffusers' default, as from_pretrained would give it."""
    from diffusers import WanTransformer3DModel

    params = inspect.signature(WanTransformer3DModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    ours = {**defaults, **arch.diffusers_config()}
    theirs = {**defaults, **{k: v for k, v in config.items() if k in defaults}}

    def same(a, b):
        return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

    return [(k, theirs[k], ours[k]) for k in defaults if not same(theirs[k], ours[k])]


def check_base_pipeline(base: str | Path, arch: WanArch) -> None:
    """Raise ValueError/FileNotFoundError naming the file and key when `base` cannot take our transformer."""
    base = Path(base)
    index = read_pipeline_index(base)
    cls, comps = index["_class_name"], components(index)
    task_of = {v: k for k, v in PIPELINES.items()}
    if cls not in task_of:
        raise ValueError(f"{base / INDEX_FILE}: _class_name={cls!r} is not a Wan2.1 pipeline (want "
                         f"{PIPELINES['t2v']} for T2V or {PIPELINES['i2v']} for I2V)")
    if task_of[cls] != arch.task:
        raise ValueError(f"{base / INDEX_FILE}: _class_name={cls!r} is for {task_of[cls].upper()} but the "
                         f"checkpoint is {arch.task.upper()}: give the {PIPELINES[arch.task]} folder the "
                         f"checkpoint was trained from")
    if "transformer_2" in comps:
        raise ValueError(f"{base / INDEX_FILE}: transformer_2={list(comps['transformer_2'])} (a Wan2.2 two-expert "
                         f"pipeline): the checkpoint is one Wan2.1 transformer; give a Wan2.1 pipeline folder")
    if comps.get("transformer") != TRANSFORMER:
        raise ValueError(f"{base / INDEX_FILE}: transformer={list(comps.get('transformer', [None, None]))}, "
                         f"want {list(TRANSFORMER)}")
    cfg_path = base / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: the base pipeline has no transformer config to check "
                                f"the checkpoint's architecture against")
    diffs = transformer_config_differences(json.loads(cfg_path.read_text()), arch)
    if diffs:
        key, theirs, ours = diffs[0]
        more = f" (also {', '.join(k for k, _, _ in diffs[1:])})" if diffs[1:] else ""
        raise ValueError(f"{cfg_path}: {key}={theirs!r} but the checkpoint's transformer has {key}={ours!r}{more}: "
                         f"give the base pipeline the checkpoint was trained from")


def export_pipeline(ckpt_dir: str | Path, base: str | Path, out: str | Path, pg, link: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> dict[str, str]:
    """`out`: the pipeline in `base` with the checkpoint's transformer; returns component -> how it got there."""
    arch = arch_from_meta(read_meta(ckpt_dir))
    check_base_pipeline(base, arch)
    return assemble_pipeline(base, out, {"transformer": lambda d: export_diffusers(ckpt_dir, d, pg, max_shard_bytes)},
                             link=link)


def save_random_pipeline(folder: str | Path, arch: WanArch, encoders: str | Path, seed: int = 0,
                         weight_noise: float = 0.05):
    """A Wan pipeline with a random transformer of `arch`, saved by diffusers itself into `folder` (for tests
    and the demo). `encoders` holds vae/, text_encoder/, tokenizer/ (+ image_encoder/, image_processor/ for
    I2V) as data.encode.tiny_models writes them. Returns the transformer (fp32, eval)."""
    import diffusers
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    encoders = Path(encoders)
    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(**arch.diffusers_config()).float().eval()
    with torch.no_grad():  # non-trivial norm scales, biases and zero-initialised tensors
        for p in transformer.parameters():
            p.add_(weight_noise * torch.randn_like(p))
    parts = dict(transformer=transformer, tokenizer=AutoTokenizer.from_pretrained(encoders / "tokenizer"),
                 text_encoder=UMT5EncoderModel.from_pretrained(encoders / "text_encoder"),
                 vae=diffusers.AutoencoderKLWan.from_pretrained(encoders / "vae"),
                 scheduler=diffusers.UniPCMultistepScheduler(  # Wan2.1's scheduler_config.json
                     prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                     flow_shift=3.0))
    if arch.task == "i2v":
        parts.update(image_encoder=CLIPVisionModel.from_pretrained(encoders / "image_encoder"),
                     image_processor=AutoImageProcessor.from_pretrained(encoders / "image_processor"))
    getattr(diffusers, PIPELINES[arch.task])(**parts).save_pretrained(folder)
    return transformer
