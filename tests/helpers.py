"""Shared test utilities: reading back W&B offline runs, running the CLI in a temp dir."""

from __future__ import annotations

import json
import struct
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1)


def iter_wandb_records(path: str | Path):
    """Yield the protobuf ``Record`` messages of an offline ``run-*.wandb`` file.

    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks
    (crc32, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4). Written here because
    current wandb releases no longer ship a Python reader.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:7] == _HEADER, f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _RECORD_HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block  # zero padding at the end of a block
            continue
        chunk = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, "corrupt W&B record"
        pos += _RECORD_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_wandb_history(run_dir: str | Path) -> dict[str, list[Any]]:
    """All values logged with ``log``/``log_metrics`` in an offline run directory, key -> list of values.

    Calls ``wandb.teardown()`` first: the wandb-core service writes the run file asynchronously and only
    flushes it completely when it shuts down (``run.finish()`` alone is not enough in-process).
    """
    import wandb

    if wandb.run is not None:  # a Trainer's WandbLogger leaves its run open; a torn-down open run would be
        wandb.run.finish()     # reused (and fail) by the next WandbLogger in this process
    wandb.teardown()
    files = sorted(Path(run_dir).rglob("run-*.wandb"))
    assert files, f"no run-*.wandb file under {run_dir}"
    history: dict[str, list[Any]] = defaultdict(list)
    for record in iter_wandb_records(files[-1]):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key].append(json.loads(item.value_json))
    return dict(history)
