"""The AI preference labels: the schema of feedback/labels.jsonl and its reader, a seeded sample of
labelled rows, and the judge's comparison question for each objective (what a label answers)."""

from __future__ import annotations

import random

from morlaif.artifacts import read_jsonl
from morlaif.config import Config
from morlaif.constitution import BUILTIN, HOLISTIC, load_constitution

# feedback/labels.jsonl: one row per (pair, objective) with these fields (what the rm stage and the
# offline RL algorithms read), plus kind, p_ab, p_ba, winner_ab, winner_ba (the side each order names),
# consistent (both name the same; a `teacher_decision` label, taken from the feedback model's own answer to the
# prompt, has no orders and is consistent by construction), raw, strategy, and for an aspect
# objective followup_question, followup_a, followup_b (the follow-up answers that were judged).
LABEL_FIELDS = ("pair_id", "prompt", "response_a", "response_b", "objective", "p_a")


def read_labels(path) -> list[dict]:
    """Rows of a labels file (feedback/labels.jsonl schema), with file and line on a missing field."""
    return read_jsonl(path, required=LABEL_FIELDS)


def subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded sample of n rows in their file order (all of them when n is None or >= len(rows))."""
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def comparison_questions(cfg: Config) -> dict[str, str]:
    """Objective name -> the judge's question: the run's constitution first, then the built-in ones, and
    'holistic' for the whole constitution."""
    con = load_constitution(cfg.constitution.name)
    questions = {p.name: p.comparison for p in con.principles}
    for name in BUILTIN:
        for p in load_constitution(name).principles:
            questions.setdefault(p.name, p.comparison)
    questions[HOLISTIC] = con.holistic().comparison
    return questions
