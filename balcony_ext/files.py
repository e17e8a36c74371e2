"""Files that an interruption never leaves torn: written whole (atomic_write) or appended line by line
(read_jsonl drops a torn last line)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> None:
    """Calls write(tmp) on a temporary file beside `path`, then renames it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_jsonl(path) -> list:
    """The records of a JSON-lines file that is appended to one line at a time (an empty list when
    there is no file). A torn last line (a write interrupted) is dropped and cut off the file, so that
    appending continues cleanly; a bad line before the last is damage, not an interruption: an error
    naming the file and the line (nothing is cut)."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    records, good = [], 0
    for n, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no end of line")
            records.append(json.loads(line))
        except ValueError as e:  # (json.JSONDecodeError and UnicodeDecodeError are ValueErrors)
            if n < len(lines):
                raise ValueError(f"{path}: line {n} of {len(lines)} is not a JSON record ({e}); the file is "
                                 "damaged: remove that line or the file") from None
            with open(path, "r+b") as f:  # the torn last line
                f.truncate(good)
            break
        good += len(line)
    return records
