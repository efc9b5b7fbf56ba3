"""Tensors <-> zarr 3 arrays: one chunk per array, blosc-zstd, bfloat16 kept bit-exact as a uint16 view.

zarr 3 rejects the dtype 'bfloat16', so a bf16 tensor is stored as its uint16 bit pattern with the array
attribute {"dtype": "bfloat16"}; reading reverses the view. Other dtypes are stored as themselves.
"""
from __future__ import annotations

import numpy as np
import torch

STORED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compressor():
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def write_array(group, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None):
    """Create (overwriting) `group/name` holding `tensor` (cast to `dtype` when given) as a single chunk."""
    x = tensor.detach().cpu()
    if dtype is not None:
        x = x.to(dtype)
    attrs = {"dtype": str(x.dtype).removeprefix("torch.")}
    data = x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or None,
                             compressors=compressor(), overwrite=True, attributes=attrs)
    arr[...] = data
    return arr


def read_array(group, name: str) -> torch.Tensor:
    arr = group[name]
    data = np.asarray(arr[...])
    if arr.attrs.get("dtype") == "bfloat16":
        return torch.from_numpy(data.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(data))


def write_strings(group, name: str, values: list[str]):
    data = np.array(values, dtype=str) if values else np.array([], dtype=str)
    arr = group.create_array(name, shape=(len(values),), dtype=str, chunks=(max(1, len(values)),),
                             overwrite=True)
    if values:
        arr[...] = data
    return arr


def read_strings(group, name: str) -> list[str]:
    arr = group[name]
    return [str(v) for v in np.asarray(arr[...]).tolist()] if arr.shape[0] else []
