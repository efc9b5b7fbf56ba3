"""Reading back what W&B wrote offline (tests of logging.wandb): the records of a run log, its history rows."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run log (run-<id>.wandb): a 7-byte header, then LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), each record a
    serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, partial = run_file.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run log"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:           # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:          # zero padding up to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial)
            records.append(record)
    return records


def history(records) -> dict[int, dict]:
    """{step: row} of the run's history records; a media entry's fields (nested keys) as one dict."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {}
            for item in r.history.item:
                *outer, key = [item.key] if item.key else list(item.nested_key)
                into = row
                for name in outer:
                    into = into.setdefault(name, {})
                into[key] = json.loads(item.value_json)
            rows[row["_step"]] = row
    return rows


def offline_env(root: Path) -> dict:
    """W&B offline (no network, nothing synced) with its settings, cache and staging under `root`."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data")}


def wandb_left(timeout: float = 10.0) -> list:
    """W&B processes (its wandb-core service) this test session started that are still alive after
    `timeout` s: a finished run's service ends with the process that started it (or at wandb.teardown)."""
    import os
    import time

    import _procs

    token = os.environ[_procs.TOKEN_VAR].split()[-1]   # this session's (tests/conftest.py tags it)
    deadline = time.time() + timeout
    while True:
        left = [p for p in _procs.carrying(token) if "wandb" in _procs.describe(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)
