"""Reading and writing diffusers model folders (config.json + safetensors, sharded or not), lazily.

`HFReader` opens each safetensors file once and reads one tensor at a time; `write_hf_folder`
consumes a stream of (name, tensor) and cuts shards, so neither holds a second model copy.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def open_safetensors(path: Path):
    """safe_open, with a damaged file (a download cut short, a full disk) named in one line: safetensors'
    own error says only "Error while deserializing header" and not which of the shards it was."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}): download or copy it again") from e


class HFReader:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg} not found: not a diffusers model folder")
        self.config = json.loads(cfg.read_text())
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / WEIGHTS).is_file():
            with open_safetensors(self.folder / WEIGHTS) as f:
                weight_map = {k: WEIGHTS for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder}: neither {WEIGHTS} nor {INDEX} found")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {key!r} not in the checkpoint")
        fname = self.weight_map[key]
        if fname not in self._handles:
            path = self.folder / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {INDEX}) is missing")
            self._handles[fname] = open_safetensors(path)
        return self._handles[fname].get_tensor(key)


def write_hf_folder(out: str | Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]],
                    max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write config.json and safetensors shards (+ index when more than one); returns the shard paths.

    Everything is written into `<out>.partial` and renamed to `out` at the end.
    """
    final_out = Path(out)
    if final_out.exists() and (not final_out.is_dir() or any(final_out.iterdir())):
        raise FileExistsError(f"output folder {final_out} exists and is not empty; refusing to overwrite it")
    out = final_out.with_name(final_out.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, written, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal size
        if shards[-1]:
            tmp = out / f"shard-{len(written):05d}.tmp"
            save_file(shards[-1], str(tmp), metadata={"format": "pt"})
            written.append((tmp, list(shards[-1])))
        shards[-1], size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    paths = []
    for i, (tmp, names) in enumerate(written):
        final = out / (WEIGHTS if len(written) == 1 else
                       WEIGHTS.replace(".safetensors", f"-{i + 1:05d}-of-{len(written):05d}.safetensors"))
        tmp.rename(final)
        paths.append(final)
        weight_map.update({n: final.name for n in names})
    if len(written) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if final_out.exists():
        final_out.rmdir()
    out.rename(final_out)
    return [final_out / p.name for p in paths]
