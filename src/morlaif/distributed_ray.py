"""Generation and judging on a Ray cluster (the optional extra `pip install 'morlaif[ray]'`).

With `ray.workers: N` (N > 0) the two heavy loops of the feedback stage run as Ray Data
pipelines over an actor pool of N actors (`map_batches` with a callable class), each actor
holding its own model:
- generation: Ray Data over the chunks of pair units (`feedback.pair_chunks`: the same chunks,
  with the same seeds, as in one process), each actor holding the policy;
- judging: Ray Data over the (pair, objective) items the label cache does not hold yet, each
  actor holding the judge `judge.make_judge` builds (a local model, or a client of
  OpenAI-compatible servers). `RayJudge` is a `Judge`: the stages that judge (feedback, with its
  calibration, `morlaif feedback --pairs`, the eval win rate) build it (`stage_judge`) instead of `make_judge`
  when `ray.workers` is set, and use it unchanged.
The driver receives each batch as an actor finishes it and appends it to the same shard or the
same label cache as the single-process path: the artifacts are the same, and a crash loses at
most the batches in flight. Rows travel as JSON strings, so nothing depends on how Ray Data
would convert nested Python objects to Arrow.

Ray is imported only here, inside the functions (an optional extra). The cluster: `ray.address` (or RAY_ADDRESS) joins an existing one;
otherwise a local one starts in this process with at least N logical CPUs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from morlaif import models
from morlaif.config import Config, RayCfg
from morlaif.errors import InputError
from morlaif.judge import Judge, judge_demos, judge_name, make_judge


ACTOR_START_S = 3600  # seconds a pool may take to start (each actor loads a model, maybe a large one)


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("ray.workers > 0 needs Ray: pip install 'morlaif[ray]'", key="ray.workers") from None
    return ray


def init(rc: RayCfg):
    """Connect to (or start) the cluster once per process; returns the `ray` module."""
    ray = _ray()
    if not ray.is_initialized():
        address = rc.address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": max(rc.workers, os.cpu_count() or 1)}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 **local)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own "[feedback] ..." lines say how far it got
        # Start handing out batches once every actor holds its model: otherwise the first actor up
        # takes the work while the others are still loading. A cluster that cannot place them
        # all fails after this wait instead of hanging.
        ctx.wait_for_min_actors_s = ACTOR_START_S
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _in_process(cfg: Config) -> Config:
    """The config an actor runs with: everything the same, except that it does not fan out again."""
    c = cfg.model_copy(deep=True)
    c.ray.workers = 0
    return c


def _pool(rc: RayCfg) -> dict:
    """map_batches arguments: a pool of ray.workers actors, each with one CPU and ray.gpus_per_worker GPUs."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=rc.workers), "num_cpus": 1, "num_gpus": rc.gpus_per_worker}


def _threads() -> None:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # Ray gives each actor its CPUs


# ----------------------------------------------------------------------------- generation


# sample_chunk(cfg, model, tok, chunk) -> shard rows: `feedback.sample_pair_chunk`, passed in by the
# feedback stage (this module never imports the stage that uses it).
SampleChunk = Callable[[Config, object, object, list], list[dict]]


class PolicyActor:
    """Holds the policy; maps a batch of chunks (JSON) to their shard rows (JSON)."""

    def __init__(self, cfg: Config, policy: str, sample_chunk: SampleChunk):
        _threads()
        self.cfg, self.sample_chunk = cfg, sample_chunk
        self.model, self.tok = models.load(policy, cfg.model)
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        rows = [json.dumps(self.sample_chunk(self.cfg, self.model, self.tok, json.loads(c))) for c in batch["chunk"]]
        return {"rows": np.array(rows, dtype=object), "worker": np.full(len(rows), os.getpid())}


def map_pair_chunks(cfg: Config, policy: str, chunks: list[list], sample_chunk: SampleChunk):
    """Shard rows of each chunk (`sample_chunk`: the feedback stage's `sample_pair_chunk`) on Ray actors
    that hold the policy, yielded as the actors finish them (`feedback.sample_pairs` drives it)."""
    ray = init(cfg.ray)
    ds = ray.data.from_items([{"chunk": json.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
    ds = ds.map_batches(PolicyActor, fn_constructor_args=(_in_process(cfg), policy, sample_chunk), batch_size=1,
                        **_pool(cfg.ray))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for rows in batch["rows"]:
            yield json.loads(rows)


# ----------------------------------------------------------------------------- judging


class JudgeActor:
    """Holds a judge; maps a batch of items {i, prompt, a, b, question} to (i, result as JSON)."""

    def __init__(self, cfg: Config, chain_of_thought: bool):
        _threads()
        self.judge, self.chain_of_thought = make_judge(cfg), chain_of_thought

    def __call__(self, batch: dict) -> dict:
        res = self.judge.prefer([str(x) for x in batch["prompt"]], [str(x) for x in batch["a"]],
                                [str(x) for x in batch["b"]], [str(x) for x in batch["question"]],
                                chain_of_thought=self.chain_of_thought)
        return {"i": batch["i"], "result": np.array([json.dumps(r) for r in res], dtype=object),
                "worker": np.full(len(res), os.getpid())}


class RayJudge(Judge):
    """A judge whose calls run on ray.workers actors. Same `model_name` and templates as the judge
    each actor holds, so it reads and writes the same label-cache entries as the in-process judge."""

    def __init__(self, cfg: Config):
        super().__init__(cot_max_new_tokens=cfg.feedback.cot_max_new_tokens, demos=judge_demos(cfg))
        self.cfg, self.rc = _in_process(cfg), cfg.ray
        self.model_name = judge_name(cfg)
        self.pids: set[int] = set()  # processes that answered: how many actors really worked

    def _batches(self, actor, args: tuple, rows: list[dict], size: int):
        """`rows` in batches of `size` through `actor(*args)` on the actors, as the batches finish."""
        ray = init(self.rc)
        ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // size))
        ds = ds.map_batches(actor, fn_constructor_args=args, batch_size=size, **_pool(self.rc))
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def prefer_stream(self, items: list[dict], chain_of_thought: bool, chunk: int):
        if not items:
            return
        # Enough batches for every actor, none larger than the caller's chunk (a chunk is what a crash may lose).
        size = max(1, min(chunk, -(-len(items) // (2 * self.rc.workers))))
        rows = [{"i": k, "prompt": it["prompt"], "a": it["a"], "b": it["b"], "question": it["question"]}
                for k, it in enumerate(items)]
        for batch in self._batches(JudgeActor, (self.cfg, chain_of_thought), rows, size):
            self.pids.update(int(w) for w in batch["worker"])
            yield [(int(i), json.loads(r)) for i, r in zip(batch["i"], batch["result"])]

    def prefer(self, prompts, responses_a, responses_b, question, chain_of_thought: bool = False) -> list[dict]:
        n = len(prompts)
        questions = [question] * n if isinstance(question, str) else list(question)
        if not (len(responses_a) == len(responses_b) == len(questions) == n):
            raise ValueError("prompts, responses_a, responses_b and question must have the same length")
        items = [{"prompt": p, "a": a, "b": b, "question": q}
                 for p, a, b, q in zip(prompts, responses_a, responses_b, questions)]
        out: list = [None] * n
        for results in self.prefer_stream(items, chain_of_thought, chunk=max(1, n)):
            for i, r in results:
                out[i] = r
        return out

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if not prompts:
            return []
        rows = [{"i": k, "prompt": p} for k, p in enumerate(prompts)]
        out: list = [None] * len(prompts)
        for batch in self._batches(AnswerActor, (self.cfg, max_new_tokens), rows,
                                   max(1, -(-len(prompts) // self.rc.workers))):
            for i, a in zip(batch["i"], batch["answer"]):
                out[int(i)] = str(a)
        return out


class AnswerActor:
    """Holds a judge; maps a batch of items {i, prompt} to (i, the judge model's own answer)."""

    def __init__(self, cfg: Config, max_new_tokens: int):
        _threads()
        self.judge, self.max_new_tokens = make_judge(cfg), max_new_tokens

    def __call__(self, batch: dict) -> dict:
        answers = self.judge.answer([str(x) for x in batch["prompt"]], self.max_new_tokens)
        return {"i": batch["i"], "answer": np.array(answers, dtype=object)}


def stage_judge(cfg: Config):
    """The judge of the feedback stage and the eval win rate: on `ray.workers` Ray actors when set
    (each holding the judge `make_judge` builds), else in this process."""
    return RayJudge(cfg) if cfg.ray.workers else make_judge(cfg)
