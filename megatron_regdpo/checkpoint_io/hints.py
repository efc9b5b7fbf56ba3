"""What to tell a user whose folder is not one of our checkpoints (no torch import: config code uses it)."""
from __future__ import annotations

from pathlib import Path


def not_a_checkpoint(ckpt_dir: str | Path, meta_file: str = "model.json") -> str:
    """`<dir>/model.json not found: ...`, with the command that makes a checkpoint when the folder is a
    diffusers model (a pipeline folder or its transformer/), or the hint that a run folder holds checkpoints."""
    folder = Path(ckpt_dir)
    text = f"{folder / meta_file} not found: {folder} is not a megatron_regdpo model checkpoint"
    hf = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    if (hf / "config.json").is_file():
        return (f"{text}; it is a diffusers folder: convert it first with "
                f"`tools/convert_checkpoint.py import --hf {hf} --out CKPT` and use checkpoint.load=CKPT")
    if (folder / "latest").is_file():
        return f"{text}; it holds training checkpoints: use one of them, {folder / (folder / 'latest').read_text().strip()}"
    return text
