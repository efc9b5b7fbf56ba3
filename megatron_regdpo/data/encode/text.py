"""The text encoder (UMT5 for Wan, through transformers), run offline so none is resident in training.

As Wan does: clean the prompt, tokenize to text_len (512) with padding and truncation, encode with the
attention mask, and zero every position beyond the real tokens. The mask is stored beside the embedding.

Legend: B batch, T text tokens (text_len), E embedding width (4096 for UMT5-XXL).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from .vae import frozen


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed), double HTML unescape, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    def __init__(self, model, tokenizer, text_len: int = 512, path: str | None = None,
                 tokenizer_path: str | None = None, device="cpu", dtype=torch.float32):
        self.model = frozen(model, device, dtype)
        self.tokenizer, self.text_len, self.device = tokenizer, text_len, torch.device(device)
        self.path, self.tokenizer_path = path, tokenizer_path
        self.dim = model.config.d_model

    @classmethod
    def load(cls, path: str | Path, tokenizer_path: str | Path | None = None, text_len: int = 512,
             device="cpu", dtype=torch.float32) -> "TextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"text encoder folder {path} has no config.json (want a transformers UMT5 folder, "
                             f"e.g. Wan2.1-T2V-14B-Diffusers/text_encoder)")
        tok_path = Path(tokenizer_path) if tokenizer_path else _sibling_or_self(path, "tokenizer")
        model = UMT5EncoderModel.from_pretrained(str(path), torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
        return cls(model, tokenizer, text_len, str(path.resolve()), str(tok_path.resolve()), device, dtype)

    def describe(self) -> dict:
        return {"class": type(self.model).__name__, "path": self.path, "tokenizer": self.tokenizer_path,
                "dim": self.dim, "text_len": self.text_len, "padding": "zeros beyond the real tokens"}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings float32 [B, T, E] zero beyond the tokens, mask bool [B, T])."""
        tokens = self.tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=self.text_len,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids_BT, mask_BT = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        emb_BTE = self.model(ids_BT, mask_BT).last_hidden_state.float()
        return emb_BTE * mask_BT[..., None], mask_BT.bool()


def _sibling_or_self(path: Path, name: str) -> Path:
    """Diffusers layout keeps the tokenizer in ../tokenizer; a flat folder keeps it beside the weights."""
    sibling = path.parent / name
    return sibling if sibling.is_dir() and not (path / "tokenizer_config.json").is_file() else path

