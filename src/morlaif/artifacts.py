"""The one place that reads and writes run artifacts (files only: which process writes is `morlaif.processes`).

- JSONL read with line-numbered errors; a torn last line (a crash mid-write) is dropped
  only where the caller says the file is an append-only shard.
- Atomic writes: temp file in the same directory, fsync, rename.
- Append-only shards: one flushed+fsynced batch at a time, so a crash loses at most one batch.
- Stage manifests: resolved config, hashes of inputs, library versions, wall time, status.
  A stage whose manifest says complete with the same config and inputs is skipped.
- One process per stage directory (an advisory lock, released by the OS even on SIGKILL);
  temp files of a killed writer are removed when the stage resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from morlaif.errors import InputError, RunError
from morlaif.processes import is_main_process, wait_for_everyone

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


# ----------------------------------------------------------------------------- stages


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("morlaif", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def config_hash(config: dict) -> str:
    """A stage's config identity (16 hex of the sorted JSON): what its manifest records is what it hashes."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "manifest.json"


def stage_is_complete(stage_dir: Path, config_hash: str, inputs: dict[str, str]) -> bool:
    m = manifest_path(stage_dir)
    if not m.is_file():
        return False
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError:
        return False
    return man.get("status") == "complete" and man.get("config_hash") == config_hash and man.get("inputs") == inputs


_STALE_TMP = re.compile(r"\..+\.tmp|.+\.tmp\d*")  # atomic_write_text's files; checkpoint.tmp, _atomic_dir's dirs


def _remove_stale_temps(stage_dir: Path, log: Callable[[str], None]) -> None:
    """Temp files and dirs of a writer that was killed: only called under the stage lock, so none is live."""
    stale = [p for p in stage_dir.rglob("*") if _STALE_TMP.fullmatch(p.name)]
    for p in sorted(stale, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if stale:
        log(f"removed {len(stale)} temporary file(s) of an interrupted run in {stage_dir}")


@contextlib.contextmanager
def stage_lock(stage_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock on RUN/.STAGE.lock: two processes appending to the same shards would
    interleave rows. The OS drops the lock when its holder dies, SIGKILL included."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unlocked
        yield
        return
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = stage_dir.parent / f".{stage_dir.name}.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise RunError(f"{stage_dir} is in use by another morlaif process (pid {holder}); wait for it or stop it")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_stage(
    name: str,
    stage_dir: str | Path,
    *,
    config: dict,
    inputs: Iterable[str | Path] = (),
    body: Callable[[Path], dict | None],
    force: bool = False,
    log: Callable[[str], None] = print,
    main_only: bool = False,
) -> Path:
    """Run `body(stage_dir)` unless a complete manifest matches; write the manifest at the end.

    `config` is the part of the run config the stage depends on (`Config.sections`): the manifest
    records it and its hash (`config_hash`), so what is recorded is exactly what decides a skip.

    - complete + same config and inputs: skipped.
    - 'running' with the same config and inputs: resumed (body finds its own shards).
    - different config or inputs: the stage directory is cleared and the stage runs anew,
      so rows made under another config never mix with new ones.
    `body` returns a dict of summary figures stored in the manifest.

    Several processes (`accelerate launch`, `torchrun`): every process decides skip/resume from
    the same files, only the main process clears the directory and writes the manifest, and the
    others wait for it. `main_only=True` (generation, labelling, evaluation, report) runs `body`
    on the main process alone; otherwise (training stages) every process runs it and `body`
    itself writes from the main process only.
    """
    main = is_main_process()
    say = log if main else (lambda msg: None)
    stage_dir = Path(stage_dir)
    # The main process holds the lock for all of them (the others never write the stage directory).
    with stage_lock(stage_dir) if main else contextlib.nullcontext():
        return _run_stage_locked(name, stage_dir, config=config, inputs=inputs, body=body,
                                 force=force, say=say, main=main, main_only=main_only)


def _run_stage_locked(name, stage_dir: Path, *, config, inputs, body, force, say, main, main_only) -> Path:
    chash = config_hash(config)
    input_hashes = {str(Path(p).name if Path(p).is_absolute() else p): sha256_file(p) for p in inputs}
    complete = not force and stage_is_complete(stage_dir, chash, input_hashes)
    m = manifest_path(stage_dir)
    prev = None
    if m.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            prev = json.loads(m.read_text())
    wait_for_everyone()  # every process has read the manifest before the main one rewrites it
    if complete:
        say(f"[{name}] complete, skipped ({stage_dir})")
        return stage_dir
    if main:
        if stage_dir.exists() and (force or not prev or prev.get("config_hash") != chash
                                   or prev.get("inputs") != input_hashes):
            if any(stage_dir.iterdir()):
                say(f"[{name}] config or inputs changed: starting over in {stage_dir}")
            shutil.rmtree(stage_dir)
        elif prev and prev.get("status") in ("running", "failed"):
            say(f"[{name}] resuming interrupted stage in {stage_dir}")
            _remove_stale_temps(stage_dir, say)
        stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = {
        "stage": name,
        "config": config,
        "config_hash": chash,
        "inputs": input_hashes,
        "versions": library_versions(),
        "started": started,
    }
    if main:
        write_json(m, {**base, "status": "running"})
    wait_for_everyone()
    try:
        summary = (body(stage_dir) or {}) if main or not main_only else {}
    except BaseException as e:
        if main:
            write_json(m, {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]})
        raise
    wait_for_everyone()  # what every process wrote is on disk before the stage is marked complete
    if main:
        write_json(m, {**base, "status": "complete", "wall_time_s": round(time.time() - started, 3),
                       "summary": summary})
    return stage_dir


def iter_batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
