"""Read the records of an offline wandb run file (`run-*.wandb`): a LevelDB-style log of protobuf `Record`s.

wandb >= 0.19 ships no Python reader for its own run files, so the tracker test decodes them here.
"""

import struct
from pathlib import Path
from typing import Dict, Iterator, List

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, LAST = 1, 4


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, "not a wandb run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history_rows(path: Path) -> List[Dict[str, str]]:
    """Every `history` record as {key: json value}; nested keys joined with '/'."""
    return [{item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            for record in read_records(path) if record.WhichOneof("record_type") == "history"]
