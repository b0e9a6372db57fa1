"""The one place that reads and writes run artifacts (files only: which process writes is `morlaif.processes`).

- JSONL read with line-numbered errors; a torn last line (a crash mid-write) is dropped
  only where the caller says the file is an append-only shard.
- Atomic writes: temp file in the same directory, fsync, rename.
- Append-only shards: one flushed+fsynced batch at a time, so a crash loses at most one batch.
- Stage manifests: resolved config, hashes of inputs, library versions, wall time, status.
  A stage whose manifest says complete with the same config and inputs is skipped; one made with
  another config or other inputs is refused, never cleared: --force moves it to RUN/.replaced/.
- Branches: a finished stage of another run is linked in (hard links) with a manifest naming it.
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
    """A stage's config identity (16 hex of the sorted JSON): recorded in its manifest beside the config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class StageConfig(dict):
    """The part of the run config a stage depends on (`Config.sections`), as JSON data, plus the default of
    each of its fields (dotted key -> value): a field a stage's manifest lacks was added by a later morlaif,
    and only counts as a change when it is set away from its default."""

    def __init__(self, data: dict, defaults: dict[str, Any]):
        super().__init__(data)
        self.defaults = defaults


_MISSING = object()


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _show(v: Any) -> str:
    text = "(unset)" if v is _MISSING else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, new value) for each setting of `new` that differs from the recorded `old`.

    With a StageConfig, field by field: a field `old` lacks counts as its default, a field `new` lacks
    (removed or renamed since) is no change. A plain dict: every leaf, a key one side lacks is a change."""
    defaults = getattr(new, "defaults", None)
    fields = defaults if defaults is not None else dict.fromkeys(dict.fromkeys(_leaves(old) + _leaves(new)), _MISSING)
    diff = []
    for key, default in fields.items():
        was, now = _get(old, key), _get(new, key)
        if was is _MISSING and defaults is not None:
            was = default
        if was != now:
            diff.append((key, was, now))
    return diff


def config_changes(old: dict, new: dict) -> list[str]:
    """`config_diff` as 'key: old -> new' lines."""
    return [f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in config_diff(old, new)]


def input_hashes(run_dir: Path, inputs: Iterable[str | Path]) -> dict[str, str]:
    """{name: sha256} of a stage's input files or dirs; a name is the path relative to the run directory
    when it is inside it (so a moved or branched run names its inputs the same), else the absolute path."""
    root = Path(run_dir).resolve()
    out = {}
    for p in inputs:
        full = Path(p).resolve()
        out[str(full.relative_to(root)) if full.is_relative_to(root) else str(full)] = sha256_file(p)
    return out


def input_changes(old: dict, new: dict) -> list[str]:
    """Inputs whose content differs from the recorded ones. Compared by content: manifests written before
    names were made relative to the run directory name the same files otherwise."""
    if sorted(old.values()) == sorted(new.values()):
        return []
    recorded = set(old.values())
    return [f"input {name} changed" for name, h in new.items() if h not in recorded] or ["inputs changed"]


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "manifest.json"


def read_manifest(stage_dir: Path) -> dict | None:
    """A stage's manifest, or None when it has none (or an unreadable one: a crash before its first write)."""
    try:
        man = json.loads(manifest_path(stage_dir).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return man if isinstance(man, dict) else None


def stage_changes(man: dict, config: dict, inputs: dict[str, str]) -> list[str]:
    """What differs between a stage's manifest and the config and inputs it would run with now."""
    return config_changes(man.get("config") or {}, config) + input_changes(man.get("inputs") or {}, inputs)


def stage_is_complete(stage_dir: Path, config: dict, inputs: dict[str, str]) -> bool:
    man = read_manifest(stage_dir)
    return bool(man) and man.get("status") == "complete" and not stage_changes(man, config, inputs)


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


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no extra space; every write of ours replaces a file (a new inode), never edits it
    except OSError:
        shutil.copy2(src, dst)  # another filesystem


def link_stage(src: Path, dst: Path) -> dict:
    """Make `dst` a copy of the finished stage `src` (hard links where the filesystem allows) with a
    manifest that records where it came from. Returns that manifest."""
    man = read_manifest(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("manifest.json"))
    man = {**man, "reused_from": str(Path(src).resolve()), "reused_at": time.time()}
    write_json(manifest_path(tmp), man)
    os.replace(tmp, dst)
    return man


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


def refusal(name: str, stage_dir: Path, changes: list[str], force: str = "--force", sets: str = "") -> InputError:
    """The one-line refusal to replace a stage made with other settings or inputs: what changed, and the
    two ways on (`force`: the flag that redoes it; `sets`: the --set options a branch would take)."""
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    run = stage_dir.parent
    return InputError(f"stage {name} was made with other settings or inputs ({shown}); nothing was changed. "
                      f"Add {force} to redo it (the old {name}/ moves to {run / REPLACED}/), or keep both with a "
                      f"branch: morlaif run --from {run} --out NEW_DIR{sets}", file=str(manifest_path(stage_dir)))


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
    records it, and it decides, with the inputs' hashes, what happens:

    - complete + same config and inputs: skipped.
    - 'running' or 'failed' with the same config and inputs: resumed (body finds its own shards).
    - another config or other inputs: refused with an InputError naming what changed; nothing is
      touched. `force=True` runs it anew after moving the old directory to RUN/.replaced/: finished
      work is never deleted.
    `body` returns a dict of summary figures stored in the manifest.

    Several processes (`accelerate launch`, `torchrun`): every process decides from the same files,
    only the main process moves directories and writes the manifest, and the others wait for it.
    `main_only=True` (generation, labelling, evaluation, report) runs `body` on the main process
    alone; otherwise (training stages) every process runs it and `body` itself writes from the main
    process only.
    """
    main = is_main_process()
    say = log if main else (lambda msg: None)
    stage_dir = Path(stage_dir)
    # The main process holds the lock for all of them (the others never write the stage directory).
    with stage_lock(stage_dir) if main else contextlib.nullcontext():
        return _run_stage_locked(name, stage_dir, config=config, inputs=inputs, body=body,
                                 force=force, say=say, main=main, main_only=main_only)


def _run_stage_locked(name, stage_dir: Path, *, config, inputs, body, force, say, main, main_only) -> Path:
    hashes = input_hashes(stage_dir.parent, inputs)
    prev = read_manifest(stage_dir)
    changes = stage_changes(prev, config, hashes) if prev else []
    wait_for_everyone()  # every process has read the manifest before the main one moves or rewrites it
    if prev and not force:
        if changes:
            raise refusal(name, stage_dir, changes)
        if prev.get("status") == "complete":
            say(f"[{name}] complete, skipped ({stage_dir})")
            return stage_dir
    if main:
        if force:
            aside = set_aside(stage_dir)
            if aside:
                say(f"[{name}] --force: the previous {name}/ moved to {aside}")
        elif stage_dir.is_dir() and any(stage_dir.iterdir()):
            say(f"[{name}] resuming interrupted stage in {stage_dir}")
            _remove_stale_temps(stage_dir, say)
        stage_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.monotonic()  # a timestamp for the manifest; a clock that never jumps for durations
    base = {
        "stage": name,
        "config": config,
        "config_hash": config_hash(config),
        "inputs": hashes,
        "versions": library_versions(),
        "started": started,
    }
    if main:
        write_json(manifest_path(stage_dir), {**base, "status": "running"})
    wait_for_everyone()
    try:
        summary = (body(stage_dir) or {}) if main or not main_only else {}
    except BaseException as e:
        if main:
            write_json(manifest_path(stage_dir), {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]})
        raise
    wait_for_everyone()  # what every process wrote is on disk before the stage is marked complete
    if main:
        write_json(manifest_path(stage_dir), {**base, "status": "complete", "wall_time_s": round(time.monotonic() - t0, 3),
                                              "summary": summary})
    return stage_dir


def iter_batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
