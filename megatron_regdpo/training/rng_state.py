"""Every rank's random state in a training checkpoint, in a form any parallel layout can resume from.

What a rank's random state is: torch's CPU generator, the current CUDA device's generator (when CUDA is
available) and megatron-core's model-parallel RNG tracker streams (`get_cuda_rng_tracker()`, when it has
any; on CPU they are CPU generator states, see parallel/cpu_compat.py).

Save (collective): every rank's states are all-gathered, so every rank holds the same
{"layout": ..., "ranks": [rank 0's, rank 1's, ...]}. It goes into the checkpoint's common (non-sharded)
state, which dist_checkpointing writes once and checks to be the same on every rank. The layout key is
{tp, pp, cp, dp, device}: the sizes fix which position of the model and of the data each global rank
holds (megatron-core orders ranks tp-cp-ep-dp-pp), the device says whether the states are CUDA ones.

Load, the rule:
- the same layout: rank r gets back exactly the states rank r saved, so a resume stays bitwise exact;
- another layout (or a checkpoint without gathered states): every rank is seeded the way a fresh start of
  this layout seeds it (parallel/groups.py: megatron-core's `model_parallel_cuda_manual_seed`, then
  setup.py's `torch.manual_seed`), with the run seed replaced by `resume_seed(run seed, step)`. So the CPU
  and CUDA default generators hold that seed on every rank, as at a fresh start (tensor-parallel peers must
  draw the same masks on replicated activations), and the tracker's streams add the rank where
  megatron-core's rule does (model-parallel: + tp rank; expert: + 100 * ep rank + etp rank). The same
  checkpoint resumed twice at the same other layout therefore continues identically.
The training noise and timesteps do not come from these generators at all (objectives/flow_matching.py
keys them by (seed, step, pair id)), so a resume at another layout changes no training input.
"""
from __future__ import annotations

import hashlib
import struct

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def layout_of(pg) -> dict:
    """The layout key of the running job (`pg`: its ProcessGroupCollection; None: data parallel only)."""
    if pg is not None:
        layout = {name: dist.get_world_size(getattr(pg, name)) for name in ("tp", "pp", "cp", "dp")}
    else:
        layout = {"tp": 1, "pp": 1, "cp": 1, "dp": dist.get_world_size() if dist.is_initialized() else 1}
    layout["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return layout


def resume_seed(seed: int, step: int) -> int:
    """The seed that stands in for the run seed when a checkpoint of `step` resumes at another layout:
    62 bits, room for the offsets megatron-core adds per stream."""
    digest = hashlib.blake2b(struct.pack("<2Q", seed % 2**64, step % 2**64), digest_size=8,
                             person=b"regdpo-resume").digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


def _tracker():
    return tensor_parallel.get_cuda_rng_tracker()


def _as_tensor(state) -> torch.Tensor:
    # graph-safe trackers keep torch.Generator objects; checkpoints hold their byte states
    return state.get_state() if isinstance(state, torch.Generator) else state.detach().cpu().clone()


def capture() -> dict:
    """This rank's random states (tensors, so a checkpoint stores them as plain data)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": {name: _as_tensor(s) for name, s in sorted(_tracker().get_states().items())}}


def gather(layout: dict) -> dict:
    """Collective over the whole job: every rank's states, the same on every rank."""
    mine = capture()
    if not dist.is_initialized():
        return {"layout": dict(layout), "ranks": [mine]}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {"layout": dict(layout), "ranks": ranks}


def _set(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    tracker, restored = _tracker(), {}
    for name, current in tracker.get_states().items():
        if isinstance(current, torch.Generator):
            current.set_state(states["tracker"][name])
            restored[name] = current
        else:
            restored[name] = states["tracker"][name].clone()
    if restored:
        tracker.set_states(restored)


def reseed(seed: int, step: int) -> None:
    """Seed this rank as a fresh start of the running layout would, with `resume_seed(seed, step)`."""
    s = resume_seed(seed, step)
    tensor_parallel.model_parallel_cuda_manual_seed(s)   # as parallel/groups.py does at start-up
    torch.manual_seed(s)                                  # as training/setup.py does before building


def restore(saved: dict | None, layout: dict, seed: int, step: int) -> bool:
    """Apply the rule of this module's docstring; True when this rank got back its own saved states."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    same = saved is not None and saved.get("layout") == layout and len(saved["ranks"]) > rank
    if same:
        mine = saved["ranks"][rank]
        same = (mine["cuda"] is not None) == torch.cuda.is_available() \
            and set(mine["tracker"]) == set(_tracker().get_states())
    if same:
        _set(saved["ranks"][rank])
    else:
        reseed(seed, step)
    return same
