"""The one place that reads and writes run artifacts (files only: which process writes is `morlaif.processes`).

- JSONL read with line-numbered errors; a torn last line (a crash mid-write) is dropped
  only where the caller says the file is an append-only shard.
- Atomic writes: temp file in the same directory, fsync, rename.
- Append-only shards: one flushed+fsynced batch at a time, so a crash loses at most one batch.
- A stage directory set aside (RUN/.replaced/) rather than deleted when --force redoes it.
The stage lifecycle (manifests, inputs, lock, skip / resume / refuse, branches) is `morlaif.lifecycle`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from morlaif.errors import InputError

# ----------------------------------------------------------------------------- files


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes; a missing or unreadable file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or type(e).__name__}", file=str(path)) from None


def decode_text(data: bytes, path: str | Path) -> str:
    """UTF-8 text, or an InputError naming the file and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError("not UTF-8 text", file=str(path), line=data[: e.start].count(b"\n") + 1) from None


def read_text(path: str | Path) -> str:
    return decode_text(read_bytes(path), path)


def _loads(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON{' line' if lineno else ''}: {e.msg}", file=str(path),
                         line=lineno or e.lineno) from None
    except RecursionError:
        raise InputError("JSON nested too deeply", file=str(path), line=lineno or None) from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    return _loads(read_text(path), path, 0)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_jsonl(path: str | Path, *, required: Iterable[str] = (), strings: Iterable[str] = (),
               shard: bool = False) -> list[dict]:
    """Read a JSONL file; every row must be an object holding the `required` keys, with a string in each of
    the `strings` keys.

    `shard=True`: the file is our own append-only shard, so an unterminated last line is a
    torn write from a crash and is dropped (it is re-done on resume). User files get no such grace.
    """
    path = Path(path)
    data = read_bytes(path)
    if shard and data and not data.endswith(b"\n"):  # torn last line: cut before decoding (it may end mid-character)
        data = data[: data.rfind(b"\n") + 1]
    rows = []
    required, strings = tuple(required), tuple(strings)
    for i, line in enumerate(decode_text(data, path).split("\n"), 1):
        if not line.strip():
            continue
        row = _loads(line, path, i)
        if not isinstance(row, dict):
            raise InputError("each line must be a JSON object", file=str(path), line=i)
        for k in required:
            if k not in row:
                raise InputError("missing field", file=str(path), line=i, key=k)
        for k in strings:
            if not isinstance(row.get(k), str):
                raise InputError("must be a string", file=str(path), line=i, key=k)
        rows.append(row)
    return rows


class ShardWriter:
    """Append-only JSONL: `append(rows)` writes one batch durably (flush + fsync).

    If the file ends in a torn line (a crash mid-batch) it is truncated to the last full line first.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as f:
                    f.truncate(cut)

    def append(self, rows: Iterable[dict]) -> None:
        blob = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
        if not blob:
            return
        with open(self.path, "a") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        return read_jsonl(self.path, shard=True) if self.path.exists() else []


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=str(path))
    if path.is_dir():  # a directory: hash of its files' names and contents
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.name != "manifest.json":
                h.update(str(p.relative_to(path)).encode())
                h.update(sha256_file(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def confine(run_dir: str | Path, rel: str | Path) -> Path:
    """Resolve `rel` inside `run_dir`; refuse paths that escape it (../, absolute, symlinks out)."""
    root = Path(run_dir).resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise InputError(f"path escapes the run directory: {rel}", file=str(run_dir))
    return p


# ----------------------------------------------------------------------------- stage directories (files only:
# when a stage is done, reused or redone is `morlaif.lifecycle`)


def config_hash(config: dict) -> str:
    """A stage's config identity (16 hex of the sorted JSON): recorded in its manifest beside the config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class StageConfig(dict):
    """The part of the run config a stage depends on (`Config.sections`), as JSON data, plus the default of
    each of its fields (dotted key -> value): a field a stage's manifest lacks was added by a later morlaif,
    and only counts as a change when it is set away from its default."""

    def __init__(self, data: dict, defaults: dict[str, Any]):
        super().__init__(data)
        self.defaults = defaults


REPLACED = ".replaced"  # RUN/.replaced/STAGE-TIME/: what --force moved out of the way


def set_aside(stage_dir: Path) -> Path | None:
    """Move a stage directory out of the way (to RUN/.replaced/STAGE-YYYYmmdd-HHMMSS) instead of deleting
    it: --force redoes a stage, and what it held stays on disk until the user removes it."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists() or (stage_dir.is_dir() and not any(stage_dir.iterdir())):
        return None
    aside = stage_dir.parent / REPLACED
    aside.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = aside / f"{stage_dir.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = aside / f"{stage_dir.name}-{stamp}-{n}"
    os.replace(stage_dir, target)
    return target


def iter_batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
