"""Loading a checkpoint runs no code from it.

dist_checkpointing reads a checkpoint through unpicklers that would call any function a crafted file
names (a shell command, say). `safe_unpickling()` swaps each for a restricted one, only while our load
runs (megatron_ckpt.safe_dist_load), and puts everything back afterwards:

1. `.metadata`: torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata does a plain
   `pickle.load` (torch 2.x). megatron-core 0.16.1 and 0.19.2 reach it from TorchDistLoadShardedStrategy,
   directly or through CachedMetadataFileSystemReader. Answer: that module's `pickle` becomes a stand-in
   whose `load` builds only the DCP metadata classes in `_METADATA_GLOBALS`.
2. Sharded objects' bytes (our RNG state, TE extra state; in 0.19.2 also the whole common state):
   torch's DefaultLoadPlanner.load_bytes, inherited by megatron's MCoreLoadPlanner, calls
   `torch.load(weights_only=False)`.
3. `common.pt`: megatron-core 0.16.1 TorchCommonLoadStrategy.load_common, 0.19.2 strategies.common.
   load_common (legacy folders), call `torch.load` without weights_only: safe only through torch >= 2.6's
   default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off.
   Answer to 2 and 3: `torch.load` is forced to weights_only=True (torch's restricted unpickler: tensors,
   storages, containers and the add_safe_globals list, to which megatron-core adds its own at import).
   What our training state needs (dicts, lists, numbers, tensors) is all in torch's default list.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
import types
from enum import Enum

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

# module -> names that `.metadata` may name (found by unpickling real checkpoints of both megatron-core
# versions: Metadata and its storage entries, megatron's saved plans, torch.Size / dtypes / layout).
_DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


def _allowed(module: str, name: str) -> bool:
    if name in _METADATA_GLOBALS.get(module, ()):
        return True
    if module == "torch":  # torch.float32 and friends: dtype objects, not callables
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _DCP and not name.startswith("__"):  # their dataclasses and enums, nothing else
        obj = getattr(__import__(module, fromlist=[name]), name, None)
        return isinstance(obj, type) and (hasattr(obj, "__dataclass_fields__") or issubclass(obj, Enum))
    return False


class RefusedGlobal(pickle.UnpicklingError):
    """A global outside the allow-list: the message is its dotted name."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


_lock = threading.RLock()
_depth = 0
# (file, problem) for each unpickling that failed inside the current block: the library wraps the error (DCP
# in a per-rank CheckpointException), so megatron_ckpt.safe_dist_load names the file from here
_refused: list[tuple[str | None, str]] = []


def _restricted_pickle_load(file, *args, **kwargs):
    try:
        return _MetadataUnpickler(file).load()
    except RefusedGlobal as e:
        _refused.append((getattr(file, "name", ".metadata"),
                         f"names {e}, which DCP metadata never holds: refused, nothing from it was run"))
        raise
    except Exception as e:  # garbage or truncated: name the file, not DCP's per-rank wrapping
        _refused.append((getattr(file, "name", ".metadata"), f"is not readable DCP metadata ({e!r})"))
        raise


def _weights_only_load(original):
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            where = str(f) if isinstance(f, str) or hasattr(f, "__fspath__") else None  # None: bytes in memory
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            named = [ln for ln in lines if "GLOBAL" in ln]  # torch's weights_only refusal names the global
            at = next((i for i, ln in enumerate(lines) if "error:" in ln), None)  # "WeightsUnpickler error: ..."
            cause = [" ".join([lines[at].split("error:", 1)[1]] + lines[at + 1:at + 2]).strip()] if at is not None \
                else [repr(e)]
            _refused.append((where, f"is not plain data ({named[0][:200]}): refused, nothing from it was run"
                             if named else f"is not a readable torch file ({cause[0][:200]})"))
            raise
    load.__wrapped__ = original
    return load


@contextlib.contextmanager
def safe_unpickling():
    """Within the block, checkpoint reads unpickle only data; yields the failures (file, problem) so far."""
    global _depth
    with _lock:  # one patch at a time; nested blocks share it
        if _depth == 0:
            saved = (dcp_filesystem.pickle, torch.load)
            stand_in = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
            stand_in.load = _restricted_pickle_load
            dcp_filesystem.pickle, torch.load = stand_in, _weights_only_load(torch.load)
            _refused.clear()
        _depth += 1
        try:
            yield _refused
        finally:
            _depth -= 1
            if _depth == 0:
                dcp_filesystem.pickle, torch.load = saved


def is_active() -> bool:
    return _depth > 0
