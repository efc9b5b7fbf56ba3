"""Megatron-Core distributed checkpoints of a model (dist_checkpointing, torch_dist format).

A checkpoint folder also carries `model.json` (family + architecture), so tools can rebuild the model
without a recipe. dist_checkpointing reshards on load: save under one parallel layout, load under another.
Saves go through save_sharded, which leaves no process behind, even when the saver is killed mid-save.
Every read goes through safe_dist_load: checksums verified first (integrity.py), then dist_checkpointing
with restricted unpicklers (safe_load.py); whatever goes wrong is one CheckpointError naming the file.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import threading
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from .fsdp2_shards import EXTRA_STATE, copy_into_shards, is_sharded, local_shards
from .hints import not_a_checkpoint
from .integrity import CheckpointError, verify, write_manifest
from .safe_load import safe_unpickling

META_FILE = "model.json"


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_model(model: torch.nn.Module, ckpt_dir: str | Path, meta: dict) -> None:
    """Write aside (`<dir>.partial`) and publish by rename, so a crash never leaves a half checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        raise FileExistsError(f"checkpoint folder {ckpt_dir} exists and is not empty; refusing to overwrite it")
    partial = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    rank0 = is_rank0()
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    save_sharded(model.sharded_state_dict(), partial)
    if rank0:
        (partial / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(partial)  # last: it covers every file above
        if ckpt_dir.exists():
            ckpt_dir.rmdir()
        partial.rename(ckpt_dir)
    barrier()


_saver: tuple[int, int] | None = None  # (pid, thread) while a save runs
_prctl = None  # libc's prctl, looked up once in the parent (no dlopen in a forked child)


def _writer_dies_with_saver() -> None:
    """At fork, in the child. megatron-core (<= 0.16) forks a writer per file in the saving thread; one
    forked during a save is SIGKILLed by the kernel when the saver dies (Linux PR_SET_PDEATHSIG), so a
    killed trainer's writers neither keep writing into a save no one publishes nor hang on its queue."""
    global _saver
    if _saver is None or not _prctl or threading.get_ident() != _saver[1]:
        return
    saver_pid, _saver = _saver[0], None  # this child's own forks are not a save's writers
    _prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != saver_pid:  # the saver died before that took effect
        os._exit(1)


@contextlib.contextmanager
def writers_die_with_this_process():
    """Processes forked by this thread inside the block die with this process (Linux; elsewhere a no-op)."""
    global _saver, _prctl
    if _prctl is None:
        _prctl = getattr(ctypes.CDLL(None), "prctl", False)  # False: not Linux, looked up already
        if _prctl:
            os.register_at_fork(after_in_child=_writer_dies_with_saver)
    _saver = (os.getpid(), threading.get_ident())
    try:
        yield
    finally:
        _saver = None


def save_sharded(state: dict, path: str | Path) -> None:
    """dist_checkpointing.save (torch_dist), synchronously, starting no process that can outlive this one."""
    # megatron-core passes a save's write results through a multiprocessing Manager queue: a server process
    # (plus a resource tracker) that lives as long as the saver and is left running when the saver is
    # SIGKILLed. A synchronous save writes and reads that queue in this process, so a plain queue does;
    # only megatron's async save (not used here) needs theirs.
    if hasattr(filesystem_async, "_results_queue") and filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    with writers_die_with_this_process():
        dist_checkpointing.save(state, str(path), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(not_a_checkpoint(ckpt_dir))
    return json.loads(path.read_text())


def load_model(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """The model's tensors from a model checkpoint or a training checkpoint (which also holds optimizer
    and trainer state: dist_checkpointing returns those common entries too; they are not the model's)."""
    if is_sharded(model):  # FSDP2: each rank reads its own shard of each weight
        wanted = local_shards(model)
        state = load_sharded(wanted, ckpt_dir)
        copy_into_shards(model, {k: v for k, v in state.items() if k in wanted})
        return
    wanted = model.sharded_state_dict()
    state = load_sharded(wanted, ckpt_dir)
    model.load_state_dict(with_own_extra_state(model, {k: v for k, v in state.items() if k in wanted}), strict=True)


def load_sharded(request: dict, ckpt_dir: str | Path) -> dict:
    """dist_checkpointing.load of `request`, whichever backend (te or local) wrote the checkpoint.

    Transformer Engine modules keep FP8 scaling metadata as `*._extra_state` objects; TE's core attention
    has some, our SDPA core attention has none, so a checkpoint written by the local backend (conversion
    from diffusers always builds it) lacks keys a te model asks for. Those are left out of the load and
    keep the model's fresh state (`with_own_extra_state`); a checkpoint's extra keys are ignored. Any other
    key the checkpoint lacks is an error that names it."""
    state, _, absent = safe_dist_load(request, ckpt_dir, strict=StrictHandling.RETURN_UNEXPECTED)
    lacking = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" (and {len(lacking) - 5} more)" if len(lacking) > 5 else "")
        raise ValueError(f"checkpoint {ckpt_dir} lacks {len(lacking)} tensor(s) this model needs: {shown}; "
                       f"was it written for another architecture?")
    return state


def safe_dist_load(request: dict, ckpt_dir: str | Path, **kwargs):
    """dist_checkpointing.load(request, ckpt_dir, **kwargs) after verifying the folder's checksums, with
    no code run from any file it reads. Collective (like dist_checkpointing.load). Any failure is one
    CheckpointError naming the folder (and the file where known); the library's error is its __cause__."""
    ckpt_dir = Path(ckpt_dir)
    verify(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise CheckpointError(ckpt_dir, ".metadata", "is missing: not a complete torch_dist checkpoint")
    try:
        with safe_unpickling() as refused:
            return dist_checkpointing.load(request, str(ckpt_dir), **kwargs)
    except CheckpointError:
        raise
    except (Exception, DCPException) as e:  # DCPException is a BaseException: it wraps every rank's error
        if refused:  # the file that failed to unpickle, not the library's multi-rank wrapping of it
            file, what = refused[0]  # file None: a sharded object's bytes inside a .distcp
            raise CheckpointError(ckpt_dir, file and Path(file).name,
                                  f"{'' if file else 'a sharded object '}{what}") from None
        cause = _root_cause(e)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(ckpt_dir, None, f"could not be read ({type(cause).__name__}: {first})") from e


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's own exception inside torch DCP's CheckpointException (which prints every rank's
    traceback), else `e`."""
    failures = getattr(e, "failures", None) if isinstance(e, DCPException) else None
    return failures[min(failures)][0] if failures else e


def with_own_extra_state(model: torch.nn.Module, loaded: dict) -> dict:
    """`loaded` (a model state dict) plus the model's own `_extra_state` entries it does not hold."""
    own = {k: v for k, v in model.state_dict().items() if k.endswith(EXTRA_STATE) and k not in loaded}
    return {**loaded, **own}
