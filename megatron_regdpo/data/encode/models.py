"""Where the frozen encoders come from (local folders; nothing is downloaded) and loading them together."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .image import ImageEncoder
from .text import TextEncoder
from .vae import WanVAE

MODELS_FILE = "models.json"


@dataclass(frozen=True)
class ModelPaths:
    vae: str
    text_encoder: str
    tokenizer: str | None = None        # default: ../tokenizer (diffusers layout) or the text encoder folder
    image_encoder: str | None = None    # I2V only
    image_processor: str | None = None  # default: ../image_processor or the image encoder folder

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MODELS_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "ModelPaths":
        path = Path(folder) / MODELS_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: not a models folder written by build_tiny_models")
        return cls(**json.loads(path.read_text()))


@dataclass
class Encoders:
    vae: WanVAE
    text: TextEncoder | None
    image: ImageEncoder | None

    def describe(self) -> dict:
        return {"vae": self.vae.describe(), "text_encoder": self.text.describe() if self.text else None,
                "image_encoder": self.image.describe() if self.image else None}


def load_encoders(paths: ModelPaths, task: str = "t2v", text_len: int = 512, device="cpu",
                  dtype: torch.dtype = torch.float32, with_text: bool = True) -> Encoders:
    if task not in ("t2v", "i2v"):
        raise ValueError(f"task {task!r} must be 't2v' or 'i2v'")
    if task == "i2v" and not paths.image_encoder:
        raise ValueError("task 'i2v' needs an image encoder folder (--image-encoder): Wan2.1 I2V conditions on "
                         "CLIP image embeddings")
    vae = WanVAE.load(paths.vae, device, dtype)
    text = TextEncoder.load(paths.text_encoder, paths.tokenizer, text_len, device, dtype) if with_text else None
    image = ImageEncoder.load(paths.image_encoder, paths.image_processor, device, dtype) if task == "i2v" else None
    return Encoders(vae, text, image)
