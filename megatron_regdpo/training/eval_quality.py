"""Quality numbers beside the validation videos, both offline (no reward model, nothing downloaded):

- the flow-matching error of policy and reference on held-out REAL clips at fixed noise levels: the mean
  squared velocity error the model was pretrained to minimise, on clips neither model trained on. Lower is a
  better fit of real video; a policy that drifts from real data (DPO collapse) shows it rising above the
  reference's. The noise is keyed on (seed, clip), the same at every evaluation, so the curve over steps
  moves only with the weights.
- the CLIP text-video score of sampled videos, when the user gives a local CLIP folder (`eval.clip`):
  100 x the cosine similarity of the prompt's CLIP text embedding and each frame's image embedding, averaged
  over up to CLIP_FRAMES evenly spaced frames (not clamped at 0, so a random model reads as ~0, honestly).

Legend: C latent channels, F/h/w latent frames/height/width, T text tokens (or pixel frames), E text width,
I image tokens, B batch (the noise levels of one clip), H/W pixels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from megatron_regdpo.objectives.flow_matching import model_timestep, noisy_latent, pair_noise, velocity_target
from megatron_regdpo.reference.base import ReferenceBatch, model_errors

FM_NOISE_STEP = 2**40  # the keyed-noise "step" of the fixed evaluation noise: never a training step
CLIP_FRAMES = 8

ModelContext = Callable[[], ContextManager[torch.nn.Module]]  # `with ctx() as model:` the model to run


@dataclass
class RealClip:
    """A held-out real clip: its latents and conditioning, keyed by an integer for the noise."""

    key: int
    x0_CFhw: torch.Tensor
    text_TE: torch.Tensor
    cond: tuple[torch.Tensor, torch.Tensor] | None = None  # I2V: (cond_CFhw, image_IE)


def plain(model: torch.nn.Module) -> ModelContext:
    return lambda: contextlib.nullcontext(model)


@torch.no_grad()
def fm_errors(models: dict[str, ModelContext], clip: RealClip, sigmas, seed: int, device, dtype,
              cp_group=None) -> dict[str, list[float]]:
    """{name: [error at each sigma]} for one clip: per-sample mean squared velocity error, every model on the
    same noisy inputs (reduced over `cp_group` before the mean, as training computes it)."""
    x0_BCFhw = clip.x0_CFhw.to(device, torch.float32).expand(len(sigmas), *clip.x0_CFhw.shape)
    eps_BCFhw = pair_noise(seed, FM_NOISE_STEP, clip.key, clip.x0_CFhw.shape, device=device).expand_as(x0_BCFhw)
    sigma_B = torch.tensor(list(sigmas), dtype=torch.float32, device=device)
    x_t = noisy_latent(x0_BCFhw, eps_BCFhw, sigma_B)
    image = None
    if clip.cond is not None:  # I2V: the condition channels after the noisy ones, CLIP tokens as context
        x_t = torch.cat([x_t, clip.cond[0].to(device, torch.float32).expand(len(sigmas), -1, -1, -1, -1)], dim=1)
        image = clip.cond[1].to(device, dtype).expand(len(sigmas), -1, -1)
    batch = ReferenceBatch(x_t=x_t.to(dtype), timestep=model_timestep(sigma_B),
                           text=clip.text_TE.to(device, dtype).expand(len(sigmas), -1, -1),
                           target=velocity_target(x0_BCFhw, eps_BCFhw), image=image)
    out = {}
    for name, ctx in models.items():
        with ctx() as model:
            out[name] = [float(e) for e in model_errors(model, batch, cp_group)]
    return out


def fm_metrics(per_clip: list[dict[str, list[float]]], sigmas) -> dict[str, float]:
    """eval/fm_err_<model> (mean over clips and noise levels) and eval/fm_err_<model>/sigma_<s> per level."""
    if not per_clip:
        return {}
    out = {}
    for name in per_clip[0]:
        rows = [c[name] for c in per_clip]
        out[f"eval/fm_err_{name}"] = sum(map(sum, rows)) / (len(rows) * len(sigmas))
        for j, s in enumerate(sigmas):
            out[f"eval/fm_err_{name}/sigma_{s:.2f}"] = sum(r[j] for r in rows) / len(rows)
    return out


class ClipScorer:
    """CLIP text-video score with a local transformers CLIPModel folder (its tokenizer and image processor
    beside it, as `save_pretrained` of a CLIPModel and a CLIPProcessor leaves them)."""

    def __init__(self, path: str | Path, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"eval.clip={path}: no config.json (want a transformers CLIPModel folder)")
        try:
            self.model = CLIPModel.from_pretrained(str(path)).eval().requires_grad_(False).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"eval.clip={path}: cannot load a CLIPModel with its tokenizer and image processor "
                             f"({e})") from e
        self.device, self.path = torch.device(device), str(path)
        self.max_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, frames_TCHW: torch.Tensor, caption: str) -> float:
        """uint8 frames [T, 3, H, W] and their prompt -> 100 x mean cosine(text, frame)."""
        t = frames_TCHW.shape[0]
        picks = sorted({round(i * (t - 1) / max(1, CLIP_FRAMES - 1)) for i in range(min(t, CLIP_FRAMES))})
        images = [frames_TCHW[i].permute(1, 2, 0).numpy() for i in picks]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer([caption], padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt").to(self.device)
        img_NE = _embeds(self.model.get_image_features(pixel_values=pixels))
        txt_1E = _embeds(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]))
        img_NE = img_NE / img_NE.norm(dim=-1, keepdim=True)
        txt_1E = txt_1E / txt_1E.norm(dim=-1, keepdim=True)
        return float(100 * (img_NE @ txt_1E.T).mean())


def _embeds(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return (out if torch.is_tensor(out) else out.pooler_output).float()


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A seeded random CLIPModel with a local character tokenizer and an image processor, saved as an eval.clip
    folder (tests and the demo: the code path of a real CLIP folder, without a download; its scores mean nothing)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from megatron_regdpo.data.encode.tiny import build_tokenizer

    tok = build_tokenizer()
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=32, eos_token_id=1, pad_token_id=0,
                                      bos_token_id=0, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)
