"""Run-folder I/O shared by every long job: jsonl rows that survive a kill."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a line cut short by a kill is skipped, so its item is redone."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append and flush rows: what is written survives a kill of the process."""
    with Path(path).open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
