"""Read the history rows of an offline W&B run back from its ``.wandb`` file (no server needed).

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
``crc32 (4) | length (2, little-endian) | type (1)`` followed by a chunk of a protobuf ``Record``
(type 1 = whole record, 2/3/4 = first/middle/last chunk).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    pos, out, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a header: skip to the next block
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            out.append(pending)
    return out


def _parse(raw: bytes) -> wandb_internal_pb2.Record:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(raw)
    return record


def records(run_dir: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """Every record of an offline run's ``.wandb`` file.

    W&B's writer process may still be flushing after ``wandb.finish()`` returns: the file is read
    again until it holds the run's ``exit`` record (or ``timeout`` seconds pass)."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [_parse(raw) for raw in _records(path)]
        except DecodeError:  # a record still being written
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history_rows(run_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Each ``log`` call of the run as a dict of key -> decoded JSON value."""
    return [
        {_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in records(run_dir, timeout)
        if r.WhichOneof("record_type") == "history"
    ]


def summary_values(run_dir: Path) -> dict[str, Any]:
    """The run's summary: every ``summary`` record's updates, later ones replacing earlier ones."""
    summary: dict[str, Any] = {}
    for r in records(run_dir):
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return summary


def artifacts(run_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """The run's logged artifacts: name -> (type, the paths of its files)."""
    return {
        r.artifact.name: (r.artifact.type, [e.path for e in r.artifact.manifest.contents])
        for r in records(run_dir)
        if r.WhichOneof("record_type") == "artifact"
    }


def metric_definitions(run_dir: Path) -> dict[str, str]:
    """``define_metric`` records: metric name or glob -> its step metric."""
    return {
        r.metric.glob_name or r.metric.name: r.metric.step_metric
        for r in records(run_dir)
        if r.WhichOneof("record_type") == "metric"
    }
