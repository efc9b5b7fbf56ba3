"""PyAV (FFmpeg) decoding of selected frames: the CPU default and the fallback for whatever DALI cannot do."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_regdpo.data.errors import DecodeFailure


def decode_pyav(path: str | Path, indices: list[int]) -> torch.Tensor:
    """uint8 [len(indices), H, W, 3] RGB: frame indices in presentation order, repeats allowed."""
    import av

    if not indices:
        raise ValueError("decode_pyav: no frame indices given")
    wanted, last = set(indices), max(indices)
    got: dict[int, np.ndarray] = {}
    seen = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: the decode dominates, use the cores
            for seen, frame in enumerate(container.decode(stream)):
                if seen in wanted:
                    got[seen] = frame.to_ndarray(format="rgb24")
                if seen >= last:
                    break
    except av.FFmpegError as e:
        raise DecodeFailure(f"{path}: PyAV failed after {len(got)} of {len(wanted)} frames: {e}") from None
    missing = sorted(wanted - got.keys())
    if missing:
        raise DecodeFailure(f"{path}: PyAV decoded {seen + 1} frames, frame {missing[0]} is missing")
    return torch.from_numpy(np.stack([got[i] for i in indices]))
