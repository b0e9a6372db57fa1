"""The stage lifecycle, one rule for every caller: lock, manifest, inputs, done?, force, branch.

A stage is a directory RUN/STAGE made by a body from a config (`Config.sections`) and inputs (files
and directories it reads). Its manifest records the config, the *content* hash of each input
(`content_hash`: weights, labels, prompts; never a file's name or time), library versions, wall
time and status. What a stage directory holds, against the config and inputs it would be made with
now, is `stage_state`; every command asks it (`run_stage` for the stage commands and `morlaif run`,
`reusable` for branches, `morlaif compare` for the run's own arm):

- complete, same config and inputs: done (skipped, reused, linked);
- running or failed, same config and inputs: resumed (the body finds its own shards);
- another config or other inputs: refused with one line naming what changed, nothing touched;
  --force moves the old directory to RUN/.replaced/ and runs it anew: finished work is never deleted.

Config: field by field, default-aware (a field a manifest lacks was added by a later morlaif and is
no change while it keeps its default). Inputs: by content, whatever path a manifest named them by.
One process per stage directory (an advisory lock, released by the OS even on SIGKILL); temp files
of a killed writer are removed when the stage resumes. A branch (`run --from`) links in a source
run's finished stage (hard links) when it is done under the branch's config and inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from morlaif.artifacts import REPLACED, config_hash, read_json, set_aside, sha256_file, write_json
from morlaif.config import Config
from morlaif.errors import InputError, RunError
from morlaif.processes import is_main_process, wait_for_everyone

# ----------------------------------------------------------------------------- content

# A manifest whose inputs were hashed by `content_hash` says so; one written before (by an older morlaif) holds
# raw file hashes under the paths it listed, and is checked that way once (`legacy_input_changes`).
HASHING = "content"
# Files in a directory that say how it was made, not what it holds: its manifest, a model card (it holds
# wall times), the completion marker of an atomic save.
NOT_CONTENT = frozenset({"manifest.json", "README.md", ".complete"})
_STALE_TMP = re.compile(r"\..+\.tmp|.+\.tmp\d*")  # atomic_write_text's files; checkpoint.tmp, _atomic_dir's dirs
# What `preference.RewardScorer.load` reads from a run: the stages that score with the run's preference
# models (rl, eval, steer) count these among their inputs; RUN/rm/metrics.json (timings) is not one.
PREFERENCE_MODELS = ("rm/model", "rm/heads.safetensors", "rm/norm.json", "rm/objectives.json")


def canonical_adapter_config(data: bytes) -> bytes:
    """A PEFT adapter_config.json as identity: PEFT writes target_modules (and the other module lists) in set
    order, which differs between processes, so lists of names are sorted; an absolute base path names a
    place, not content (the base's content is an input of its own where a stage reads it), so it is dropped."""
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return data  # not ours to judge here: hashed as it is, the loader names the error
    if not isinstance(cfg, dict):
        return data
    for k, v in cfg.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            cfg[k] = sorted(v)
    if os.path.isabs(str(cfg.get("base_model_name_or_path") or "")):
        cfg["base_model_name_or_path"] = "(a local path)"
    return json.dumps(cfg, sort_keys=True).encode()


def content_hash(path: str | Path) -> str:
    """sha256 of what a stage reads at `path`, the one hash of every stage input.

    A file: its bytes (adapter_config.json canonical: `canonical_adapter_config`). A directory (a saved
    model, an adapter, a prompt folder): its files' relative names and content hashes, except those that
    record how it was made (`NOT_CONTENT`) and temp files of an interrupted writer. InputError when missing."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if p.is_file() and p.name not in NOT_CONTENT and not any(_STALE_TMP.fullmatch(q) for q in rel.parts):
                h.update(f"{rel.as_posix()}\0{content_hash(p)}\n".encode())
        return h.hexdigest()
    if path.name == "adapter_config.json" and path.is_file():
        return hashlib.sha256(canonical_adapter_config(path.read_bytes())).hexdigest()
    return sha256_file(path)  # InputError naming it when missing


def input_name(root: Path, path: str | Path) -> str:
    """How a manifest names an input: relative to the run directory when inside it (a moved or branched run
    names its inputs the same), else the absolute path."""
    full, root = Path(path).resolve(), Path(root).resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(full)


def input_hashes(root: Path, inputs: Iterable[str | Path]) -> dict[str, str]:
    """{name (`input_name`): content_hash} of a stage's inputs."""
    return {input_name(root, p): content_hash(p) for p in inputs}


def resolve_input(root: Path, name: str) -> Path:
    """The path a manifest's input name stands for in the run `root`."""
    return Path(name) if Path(name).is_absolute() else Path(root) / name


# ----------------------------------------------------------------------------- the rule

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

    With a StageConfig (`Config.sections`), field by field: a field `old` lacks counts as its default, a
    field `new` lacks (removed or renamed since) is no change. A plain dict: every leaf, a key one side
    lacks is a change."""
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


def input_changes(old: dict, new: dict) -> list[str]:
    """Inputs whose content differs from the recorded ones, compared by content: whatever name a manifest
    gave an input (an older morlaif, another run of a branch), the same content is the same input."""
    if sorted(old.values()) == sorted(new.values()):
        return []
    recorded = set(old.values())
    return [f"input {name} changed" for name, h in new.items() if h not in recorded] or ["inputs changed"]


def legacy_input_changes(recorded: dict, root: Path) -> list[str]:
    """A manifest written before inputs were hashed by content: each input it recorded must still hold the
    raw bytes it held, at the path it named (what that morlaif checked)."""
    out = []
    for name, digest in recorded.items():
        p = resolve_input(root, name)
        if not p.exists() or sha256_file(p) != digest:
            out.append(f"input {name} changed")
    return out


def stage_changes(man: dict, config: dict, hashes: dict[str, str], root: Path) -> list[str]:
    """What differs between a stage's manifest and the config and input hashes it would be made with now."""
    recorded = man.get("inputs") or {}
    inputs = (input_changes(recorded, hashes) if man.get("input_hashing") == HASHING
              else legacy_input_changes(recorded, root))
    return config_changes(man.get("config") or {}, config) + inputs


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / "manifest.json"


def read_manifest(stage_dir: Path) -> dict | None:
    """A stage's manifest, or None when it has none (or an unreadable one: a crash before its first write)."""
    try:
        man = json.loads(manifest_path(stage_dir).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return man if isinstance(man, dict) else None


@dataclass(frozen=True)
class StageState:
    """A stage directory against the config and inputs it would be made with now."""

    manifest: dict | None  # None: nothing there yet
    changes: list[str]  # config keys and inputs that differ from the manifest's ('key: old -> new', 'input X changed')
    hashes: dict[str, str]  # the inputs' content hashes now

    @property
    def done(self) -> bool:
        """Complete, and made with this config from these inputs: skip it, reuse it."""
        return self.manifest is not None and self.manifest.get("status") == "complete" and not self.changes


def stage_state(stage_dir: Path, config: dict, inputs: Iterable[str | Path], root: Path | None = None) -> StageState:
    """The one rule for 'is this stage done?'. `root`: what input names are relative to (the stage's run)."""
    stage_dir = Path(stage_dir)
    root = Path(root) if root is not None else stage_dir.parent
    hashes = input_hashes(root, inputs)
    man = read_manifest(stage_dir)
    return StageState(man, stage_changes(man, config, hashes, root) if man else [], hashes)


def refusal(name: str, stage_dir: Path, changes: list[str], force: str = "--force", sets: str = "") -> InputError:
    """The one-line refusal to replace a stage made with other settings or inputs: what changed, and the
    two ways on (`force`: the flag that redoes it; `sets`: the --set options a branch would take)."""
    shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    run = stage_dir.parent
    return InputError(f"stage {name} was made with other settings or inputs ({shown}); nothing was changed. "
                      f"Add {force} to redo it (the old {name}/ moves to {run / REPLACED}/), or keep both with a "
                      f"branch: morlaif run --from {run} --out NEW_DIR{sets}", file=str(manifest_path(stage_dir)))


# ----------------------------------------------------------------------------- running a stage


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("morlaif", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


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


def remove_stale_temps(stage_dir: Path, log: Callable[[str], None]) -> None:
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
    """Run `body(stage_dir)` unless `stage_state` says the stage is done; write the manifest at the end.

    `config` is the part of the run config the stage depends on (`Config.sections`), `inputs` the files
    and directories it reads (hashed by content). Done: skipped. Interrupted with the same config and
    inputs: resumed. Made with another config or other inputs: refused (InputError naming what changed),
    nothing touched; `force=True` runs it anew after moving the old directory to RUN/.replaced/.
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
        return _run_locked(name, stage_dir, config=config, inputs=inputs, body=body,
                           force=force, say=say, main=main, main_only=main_only)


def _adopt(stage_dir: Path, man: dict, hashes: dict[str, str]) -> None:
    """A finished stage an older morlaif recorded by raw file hashes, found unchanged that way: record its
    inputs' content hashes, so that from now on a change of their content is noticed."""
    write_json(manifest_path(stage_dir), {**man, "inputs": hashes, "input_hashing": HASHING})


def _run_locked(name, stage_dir: Path, *, config, inputs, body, force, say, main, main_only) -> Path:
    state = stage_state(stage_dir, config, inputs)
    prev = state.manifest
    wait_for_everyone()  # every process has read the manifest before the main one moves or rewrites it
    if prev and not force:
        if state.changes:
            raise refusal(name, stage_dir, state.changes)
        if state.done:
            if main and prev.get("input_hashing") != HASHING:
                _adopt(stage_dir, prev, state.hashes)
            say(f"[{name}] complete, skipped ({stage_dir})")
            return stage_dir
    if main:
        if force:
            aside = set_aside(stage_dir)
            if aside:
                say(f"[{name}] --force: the previous {name}/ moved to {aside}")
        elif stage_dir.is_dir() and any(stage_dir.iterdir()):
            say(f"[{name}] resuming interrupted stage in {stage_dir}")
            remove_stale_temps(stage_dir, say)
        stage_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.monotonic()  # a timestamp for the manifest; a clock that never jumps for durations
    base = {
        "stage": name,
        "config": config,
        "config_hash": config_hash(config),
        "inputs": state.hashes,
        "input_hashing": HASHING,
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
            error = f"{type(e).__name__}: {e}"[:500]
            write_json(manifest_path(stage_dir), {**base, "status": "failed", "error": error})
        raise
    wait_for_everyone()  # what every process wrote is on disk before the stage is marked complete
    if main:
        write_json(manifest_path(stage_dir), {**base, "status": "complete",
                                              "wall_time_s": round(time.monotonic() - t0, 3), "summary": summary})
    return stage_dir


# ----------------------------------------------------------------------------- commands over several stages


def recorded_config(cfg: Config, manifest: dict) -> tuple[dict, dict]:
    """(the config a stage's manifest recorded, what `cfg` gives the same sections now)."""
    recorded = manifest.get("config") or {}
    return recorded, cfg.sections(*[k for k in recorded if k != "seed" and k in Config.model_fields])


def check_stages(cfg: Config, run_dir: Path, names: list[str], force: set[str], force_flag: str) -> None:
    """Refuse (InputError, one line) when a stage of `names` holds work made with other settings than `cfg`
    gives it, unless `force` covers it: a forced stage and every stage after it in `names` run anew.
    Called before config.yaml is rewritten and before any stage runs, so a refused command leaves the run
    as it was. Settings only: an input is checked when its stage runs (an earlier stage may remake it)."""
    forced = False
    for name in names:
        forced = forced or name in force
        man = read_manifest(run_dir / name)
        if forced or not man:
            continue
        diff = config_diff(*recorded_config(cfg, man))
        if diff:
            sets = "".join(f" --set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, _, v in diff[:3])
            raise refusal(name, run_dir / name, config_changes(*recorded_config(cfg, man)),
                          force_flag.format(stage=name), sets)


def force_stage(run_dir: Path, name: str, say: Callable[[str], None]) -> None:
    """Move a stage's directory to RUN/.replaced/ (main process) so that it runs anew."""
    if is_main_process():
        with stage_lock(run_dir / name):
            aside = set_aside(run_dir / name)
        if aside:
            say(f"[{name}] the previous {name}/ moved to {aside}")
    wait_for_everyone()  # no process decides to skip the stage from the directory being moved


# ----------------------------------------------------------------------------- branches

BRANCH_FILE = "branch.json"  # NEW/branch.json: the run a branch was made from


def reusable(cfg: Config, run_dir: Path, source: Path, name: str) -> Path | None:
    """The source run's stage directory when it is done as `run_dir` would make it: `stage_state` of it under
    `cfg` (the sections it recorded) and the inputs it recorded, read at the same places in `run_dir`."""
    src = Path(source) / name
    man = read_manifest(src)
    if not man or man.get("status") != "complete":
        return None
    paths = [resolve_input(run_dir, n) for n in man.get("inputs") or {}]
    if not all(p.exists() for p in paths):
        return None
    state = stage_state(src, recorded_config(cfg, man)[1], paths, root=run_dir)
    return src if state.done else None


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


def link_from(cfg: Config, run_dir: Path, source: Path, name: str, say: Callable[[str], None]) -> bool:
    """Link the source run's stage into this run when it is reusable and this run has none; True when it was."""
    dst = run_dir / name
    if read_manifest(dst) or (dst.exists() and any(dst.iterdir())):
        return False
    src = reusable(cfg, run_dir, source, name)
    if src is not None and is_main_process():
        with stage_lock(dst):
            link_stage(src, dst)
        say(f"[{name}] reused from {src} (linked)")
    wait_for_everyone()
    return src is not None


def branch_source(run_dir: Path) -> Path | None:
    """The run a branch was made from (NEW/branch.json), or None."""
    f = run_dir / BRANCH_FILE
    return Path(read_json(f)["from"]) if f.is_file() else None


def start_branch(run_dir: Path, source: Path) -> None:
    """Make `run_dir` a branch of `source`: refused when it is another run, or a branch of another one."""
    source = source.resolve()
    if not (source / "config.yaml").is_file():
        raise InputError("not a run directory (no config.yaml)", file=str(source), key="--from")
    if source == run_dir.resolve():
        raise InputError("--from and --out name the same run", key="--from")
    known = branch_source(run_dir) if run_dir.is_dir() else None
    if known is None and run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError("already holds a run that is not a branch: choose a new --out", file=str(run_dir),
                         key="--out")
    if known is not None and known != source:
        raise InputError(f"is a branch of {known}, not of {source}", file=str(run_dir), key="--from")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json(run_dir / BRANCH_FILE, {"from": str(source), "created": time.time()})
