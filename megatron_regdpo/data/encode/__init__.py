"""Frozen encoders run offline: the Wan VAE, the UMT5 text encoder, the CLIP image encoder (I2V)."""
from .image import ImageEncoder
from .models import Encoders, ModelPaths, load_encoders
from .text import TextEncoder, prompt_clean
from .tiny import build_tiny_models, tiny_models
from .vae import WanVAE

__all__ = ["Encoders", "ImageEncoder", "ModelPaths", "TextEncoder", "WanVAE", "build_tiny_models", "load_encoders",
           "prompt_clean", "tiny_models"]
