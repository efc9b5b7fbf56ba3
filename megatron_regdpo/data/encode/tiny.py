"""Seeded small random encoders of the real classes, saved as local folders (for tests and the demo).

Same classes and code paths as the real Wan2.1 encoders: AutoencoderKLWan (z_dim 16, tiny widths),
UMT5EncoderModel with a character-level WordPiece tokenizer built here (no download), CLIPVisionModel
with 257 tokens. Widths default to the `debug` Wan's text width (32) and a debug image width (32).
"""
from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch

from .models import ModelPaths

TINY_VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def build_tokenizer():
    """A character-level WordPiece tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *chars, *("##" + c for c in chars)])}
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_models(folder: str | Path, seed: int = 0, text_dim: int = 32, image_dim: int = 32) -> ModelPaths:
    """Write vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/ and models.json under `folder`."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from .image import _processor_class

    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(folder / "vae")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    umt5 = UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(umt5).save_pretrained(folder / "text_encoder")
    clip = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=2,
                            num_attention_heads=4, image_size=224, patch_size=14)  # 16 x 16 + 1 = 257 tokens
    CLIPVisionModel(clip).save_pretrained(folder / "image_encoder")
    _processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        folder / "image_processor")
    paths = ModelPaths(vae=str((folder / "vae").resolve()), text_encoder=str((folder / "text_encoder").resolve()),
                       tokenizer=str((folder / "tokenizer").resolve()),
                       image_encoder=str((folder / "image_encoder").resolve()),
                       image_processor=str((folder / "image_processor").resolve()))
    paths.save(folder)
    return paths


def tiny_models(folder: str | Path, seed: int = 0) -> ModelPaths:
    """The tiny models in `folder`, built on first use (so a resumed run and negative generation reuse them)."""
    folder = Path(folder)
    if (folder / "models.json").is_file():
        return ModelPaths.read(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():  # left by a run killed while building
        shutil.rmtree(tmp)
    build_tiny_models(tmp, seed)
    tmp.rename(folder)  # publish whole, so a folder with models.json is always complete
    return _rebased(folder)


def _rebased(folder: Path) -> ModelPaths:
    """models.json with the paths of `folder` (it was written under the .partial name)."""
    paths = ModelPaths(*(str((folder / name).resolve()) for name in
                         ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")))
    paths.save(folder)
    return paths
