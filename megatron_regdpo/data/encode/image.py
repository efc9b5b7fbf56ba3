"""The I2V image encoder: CLIP vision (ViT-H/14 for Wan2.1), penultimate hidden states, 257 x 1280.

As WanImageToVideoPipeline.encode_image: CLIP's image processor on the reference image (the normalised
first frame), then `hidden_states[-2]` of CLIPVisionModel.

Legend: B batch, I image tokens (257), E width (1280), C/H/W pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .vae import frozen


def _processor_class():
    import transformers

    # transformers 5 routes CLIPImageProcessor through torchvision; the PIL variant is the same maths
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ImageEncoder:
    def __init__(self, model, processor, path: str | None = None, processor_path: str | None = None,
                 device="cpu", dtype=torch.float32):
        self.model = frozen(model, device, dtype)
        self.processor, self.path, self.processor_path = processor, path, processor_path
        self.device, self.dtype = torch.device(device), dtype
        self.dim = model.config.hidden_size
        self.tokens = (model.config.image_size // model.config.patch_size) ** 2 + 1

    @classmethod
    def load(cls, path: str | Path, processor_path: str | Path | None = None, device="cpu",
             dtype=torch.float32) -> "ImageEncoder":
        from transformers import CLIPVisionModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"image encoder folder {path} has no config.json (want a transformers CLIP vision "
                             f"folder, e.g. Wan2.1-I2V-14B-720P-Diffusers/image_encoder)")
        proc_path = Path(processor_path) if processor_path else (
            path.parent / "image_processor" if (path.parent / "image_processor").is_dir() else path)
        model = CLIPVisionModel.from_pretrained(str(path), torch_dtype=dtype)
        processor = _processor_class().from_pretrained(str(proc_path))
        return cls(model, processor, str(path.resolve()), str(proc_path.resolve()), device, dtype)

    def describe(self) -> dict:
        return {"class": type(self.model).__name__, "path": self.path, "processor": self.processor_path,
                "dim": self.dim, "tokens": self.tokens, "layer": "hidden_states[-2]"}

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] -> float32 [B, I, E]."""
        uint8_BHWC = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        pixels = self.processor(images=list(uint8_BHWC.cpu().numpy()), return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()

