"""Stage `feedback`: response pairs from the SFT policy and one AI preference label per (pair, objective).

Strategies (docs/design.md, "AI feedback"), chosen by `cfg.feedback.strategy`:
- `judge`: two samples per train prompt; the judge (morlaif.judge) reads the option-letter
  probabilities of a multiple-choice comparison, in both orders, p_a = (p_AB + 1 - p_BA) / 2.
- `contrastive` (RLCD): per objective, the policy answers each prompt twice, once after the
  principle's positive demonstration turns and once after its negative ones (small models follow
  examples, not instructions, as measured on SmolLM2-135M); the positive answer is labelled preferred. Which side is
  `a` is drawn per pair (seeded), so p_a = 1 about half the time. Its quality is measured: the
  refusal rate of positive- vs negative-context answers on harmful prompts.
Aspects (`principle:motivation`, `principle:consequence`): the policy answers the follow-up
question as a next turn after each response, and that answer is what gets judged.

Resumability: generation appends to feedback/pairs.shard.jsonl one batch at a time; judge
labels go to an append-only cache (feedback/cache.jsonl) keyed by (judge model, template hash,
objective, question, prompt, a, b), so a resumed stage repeats neither a sample nor a label.
pairs.jsonl, labels.jsonl and metrics.json are written at the end, atomically.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
import time
from pathlib import Path

from morlaif import distributed_ray, models
from morlaif import judge as judge_mod
from morlaif.artifacts import ShardWriter, iter_batches, read_jsonl, write_json, write_jsonl
from morlaif.config import Config, derived_seed
from morlaif.constitution import HOLISTIC, Objective, Principle, aspect_questions, load_constitution
from morlaif.distributed_ray import stage_judge
from morlaif.errors import InputError
from morlaif.generation import Sampling, chat, followup_answers, generate, render
from morlaif.labels import comparison_questions, subset
from morlaif.lifecycle import run_stage
from morlaif.promptsets import load_calibration, load_labelled, train_prompts
from morlaif.refusal import is_refusal
from morlaif.stats import mean

SECTIONS = ("model", "constitution", "generation", "feedback")


# ----------------------------------------------------------------------------- objectives and contexts


def stage_objectives(cfg: Config) -> list[Objective]:
    """The constitution's objectives, plus the holistic one when cfg.feedback.holistic."""
    con = load_constitution(cfg.constitution.name)
    objs = con.objectives(cfg.constitution.objectives)
    if cfg.feedback.holistic:
        objs.append(Objective(con.holistic()))
    return objs


def contrast_context(principle: Principle, side: str, principles: list[Principle], max_demos: int) -> tuple[str | None, list[dict]]:
    """(system, history) for the positive or negative side of a principle.

    Few-shot demonstration turns from the principle (holistic: round-robin over every principle's
    demonstrations). A principle without demonstrations falls back to a system instruction,
    which we measured to move SmolLM2-135M far less.
    """
    if principle.name == HOLISTIC:
        pools = [list(p.demonstrations.get(side, [])) for p in principles]
        demos = []
        while len(demos) < max_demos and any(pools):
            for pool in pools:
                if pool and len(demos) < max_demos:
                    demos.append(pool.pop(0))
    else:
        demos = list(principle.demonstrations.get(side, []))[:max_demos]
    if demos:
        history = []
        for d in demos:
            history += [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["response"]}]
        return None, history
    desc = principle.description
    system = f"In every answer, follow this principle: {desc}" if side == "positive" else \
        f"In every answer, act against this principle: {desc}"
    return system, []


def _judge_inputs(pair: dict, obj: Objective, questions: dict[str, str]) -> tuple[str, str, str]:
    """What the judge compares for an objective: the responses, or (aspects) the follow-up answers."""
    if obj.aspect == "action":
        return pair["prompt"], pair["response_a"], pair["response_b"]
    fa, fb = pair["followups"][obj.aspect]
    prompt = f'{pair["prompt"]}\n\n(After answering, the assistant was asked: "{questions[obj.aspect]}")'
    return prompt, fa, fb


# ----------------------------------------------------------------------------- cached labelling


def cache_key(judge, chain_of_thought: bool, objective: str, question: str, prompt: str, a: str, b: str) -> str:
    blob = json.dumps([judge.model_name, judge.template_hash(chain_of_thought), objective, question, prompt, a, b])
    return hashlib.sha256(blob.encode()).hexdigest()


def label_with_cache(judge, items: list[dict], cache_path: Path, chain_of_thought: bool, chunk: int,
                     log=print) -> tuple[list[dict], dict]:
    """Judge `items` (objective, question, prompt, a, b), skipping what the cache holds.

    `chunk` labels are judged per call and appended to the cache at once: a crash loses at most that many.
    Returns one result per item and {'new': labels judged now, 'seconds': time spent judging}.
    """
    shard = ShardWriter(cache_path)
    cached = {r["key"]: r for r in shard.rows()}
    keys = [cache_key(judge, chain_of_thought, it["objective"], it["question"], it["prompt"], it["a"], it["b"])
            for it in items]
    todo, seen = [], set()
    for k, it in zip(keys, items):
        if k not in cached and k not in seen:
            seen.add(k)
            todo.append((k, it))
    t0 = time.monotonic()
    n_done = 0
    # Judge.prefer_stream: chunk by chunk through prefer() (any object with prefer() will do);
    # a distributed judge (RayJudge) streams its workers' batches instead.
    stream = getattr(judge, "prefer_stream", None) or functools.partial(judge_mod.Judge.prefer_stream, judge)
    for results in stream([it for _, it in todo], chain_of_thought, chunk):  # [(index in todo, result)]
        rows = [{"key": todo[i][0], "objective": todo[i][1]["objective"], **r} for i, r in results]
        shard.append(rows)
        cached.update((r["key"], r) for r in rows)
        n_done += len(rows)
        log(f"[feedback] judged {n_done}/{len(todo)} labels")
    return [cached[k] for k in keys], {"new": len(todo), "seconds": time.monotonic() - t0}


def calibrate(cfg: Config, judge, rows: list[dict], cache_path: Path, log=print) -> dict:
    """How the judge agrees with labelled pairs (`preferred` a or b; a row without `objective` is asked the
    holistic question): agreement (ties count half), position consistency, the share of decisive labels,
    and the trivial judges it must beat (always the longer / always the shorter response)."""
    questions = comparison_questions(cfg)
    items = []
    for i, r in enumerate(rows, 1):
        obj = r.get("objective") or HOLISTIC
        if obj not in questions:
            raise InputError(f"objective '{obj}' is in neither the run's nor a built-in constitution", line=i,
                             key="objective")
        items.append({"objective": obj, "question": questions[obj], "prompt": r["prompt"], "a": r["response_a"],
                      "b": r["response_b"]})
    res, stats = label_with_cache(judge, items, cache_path, cfg.feedback.chain_of_thought, cfg.feedback.label_chunk,
                                  log=log)

    def agree(p_a: float, r: dict) -> float:
        return 0.5 if p_a == 0.5 else float((p_a > 0.5) == (r["preferred"] == "a"))

    def by_length(longer: bool) -> float:  # a judge that always picks the longer (shorter) response
        return mean([0.5 if len(r["response_a"]) == len(r["response_b"])
                     else float(((len(r["response_a"]) > len(r["response_b"])) == longer) == (r["preferred"] == "a"))
                     for r in rows])

    by_obj: dict[str, list[float]] = {}
    for it, lab, r in zip(items, res, rows):
        by_obj.setdefault(it["objective"], []).append(agree(lab["p_a"], r))
    return {
        "agreement": mean([agree(lab["p_a"], r) for lab, r in zip(res, rows)]),
        "n": len(rows),
        "position_consistency": mean([float(lab["consistent"]) for lab in res]),
        "mean_p_first": mean([(lab["p_ab"] + lab["p_ba"]) / 2 for lab in res]),
        "decisive_share": decisive_share(res),
        "by_objective": {k: mean(v) for k, v in by_obj.items()},
        "chance": 0.5,
        "longer_response_baseline": by_length(True),
        "shorter_response_baseline": by_length(False),
        "judge_model": judge.model_name,
        "seconds": round(stats["seconds"], 2),
        "labels_judged": stats["new"],
    }


def decisive_share(labels: list[dict], margin: float = 0.2) -> float | None:
    """Share of labels with |p_a - 0.5| > margin."""
    return mean([float(abs(lab["p_a"] - 0.5) > margin) for lab in labels])


def target_preferred(pairs: list[dict], labels: list[dict], wins: bool = False) -> dict:
    """policy_vs_target, base_vs_target: mean P(SL target preferred over the sampled response), per prompt kind
    and objective; with `wins`, the share of labels that prefer the target (P > 0.5): a judge whose
    probabilities hover near 0.5 can still name the better side."""
    side = {p["pair_id"]: p["sources"].index("target") for p in pairs}  # 0: the target is response a
    out: dict = {}
    for kind in ("harmful", "benign"):
        rows = [lab for lab in labels if lab.get("kind") == kind and lab["pair_id"] in side]
        by_obj: dict[str, list[float]] = {}
        for lab in rows:
            p = lab["p_a"] if side[lab["pair_id"]] == 0 else 1.0 - lab["p_a"]
            by_obj.setdefault(lab["objective"], []).append(float(p > 0.5) if wins else p)
        out[kind] = {o: mean(v) for o, v in by_obj.items()}
    return out


def binary_entropy_bits(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# ----------------------------------------------------------------------------- generation


def _policy_name(cfg: Config, run_dir: Path) -> tuple[str, str | None]:
    """The policy that samples the pairs (all but base_vs_target: the SFT policy; where the base answers, it is
    the SFT policy with its adapter off)."""
    if cfg.feedback.pairs == "base_vs_target" and cfg.feedback.strategy == "judge":
        return cfg.model.policy, None
    sft = run_dir / "sft" / "model"
    if models.saved_model_files(sft):  # a LoRA adapter, or a whole model (sft.use_peft false)
        return str(sft), None
    return cfg.model.policy, f"{sft} is missing: pairs sampled from {cfg.model.policy} instead of the SFT policy"


def _sft_inputs(run_dir: Path) -> list[Path]:
    return models.saved_model_files(run_dir / "sft" / "model")


def _sample(model, tok, cfg: Config, convs: list, seed: int, max_new_tokens: int, temperature: float | None = None) -> list[str]:
    s = Sampling.from_config(cfg, "pair").replace(max_new_tokens=max_new_tokens)
    if temperature is not None:
        s = s.replace(temperature=temperature)
    return generate(model, tok, convs, **s.kwargs(), seed=seed, progress=False)


def _followups(model, tok, cfg: Config, seed: int, prompts: list[str], responses: list[str], aspects: list[str],
               contexts=None) -> dict[str, list[str]]:
    """The policy's answers to the aspects' follow-up questions, sampled as every stage samples them."""
    return followup_answers(model, tok, prompts, responses, aspects, seed=seed,
                            sampling=Sampling.from_config(cfg, "followup"), contexts=contexts)


def pair_chunks(cfg: Config, prompts: list[dict], done: set[str]) -> list[list]:
    """The pair units still to sample, in chunks (one generate batch each, the unit of resumption).

    judge: units (pair_id, prompt row), two samples each; contrastive: (objective name, prompt
    index, prompt row), one answer per side. Each chunk's seed comes from its first unit, so a
    chunk samples the same wherever it runs (in this process or on a Ray actor).
    """
    if cfg.feedback.strategy == "judge":
        units = [(f"p{i:04d}", r) for i, r in enumerate(prompts) if f"p{i:04d}" not in done]
    else:
        units = [(o.name, i, r) for o in stage_objectives(cfg) for i, r in enumerate(prompts)
                 if f"{o.name}/p{i:04d}" not in done]
    return list(iter_batches(units, max(1, cfg.generation.batch_size // 2)))


def pair_order(cfg: Config, prompts: list[dict]) -> dict[str, int]:
    """pair_id -> position in the unit order: pairs.jsonl keeps it whatever order chunks finish in."""
    if cfg.feedback.strategy == "judge":
        return {f"p{i:04d}": i for i in range(len(prompts))}
    names = [o.name for o in stage_objectives(cfg)]
    return {f"{o}/p{i:04d}": k * len(prompts) + i for k, o in enumerate(names) for i in range(len(prompts))}


def sample_pair_chunk(cfg: Config, model, tok, chunk: list) -> list[dict]:
    """Shard rows for one chunk of `pair_chunks` (a chunk may come back from JSON: units as lists)."""
    if cfg.feedback.strategy == "judge":
        aspects = sorted({o.aspect for o in stage_objectives(cfg)} - {"action"})
        return _judge_pair_rows(cfg, model, tok, chunk, aspects)
    by_name = {o.name: o for o in stage_objectives(cfg)}
    principles = load_constitution(cfg.constitution.name).principles
    return _contrastive_pair_rows(cfg, [(by_name[o], i, r) for o, i, r in chunk], principles, model, tok)


def _judge_pair_rows(cfg, model, tok, batch, aspects) -> list[dict]:
    """One pair per prompt (`feedback.pairs`): an SFT-policy sample against the other side of refusing, two
    samples of the SFT policy, an SFT-policy sample against a base-policy sample, or a sample against the
    prompt's SL target; the sides' order drawn per pair (seeded); and their follow-up answers for aspect
    objectives."""
    max_new = cfg.feedback.max_new_tokens or cfg.generation.max_new_tokens
    seed = derived_seed(cfg.seed, int(batch[0][0][1:]) * 7_919)  # per chunk: a resumed chunk resamples the same
    mode = cfg.feedback.pairs
    convs = [chat(r["prompt"]) for _, r in batch]
    first = _sample(model, tok, cfg, convs, seed, max_new)  # the SFT policy (base_vs_target: the base)
    n = len(batch)
    if mode == "policy_vs_refusal":
        second, second_names = _refusal_contrast(cfg, model, tok, convs, first, seed + 1, max_new)
    elif mode == "policy_samples":
        second, second_names = _sample(model, tok, cfg, convs, seed + 1, max_new), ["policy"] * n
    elif mode == "policy_vs_base":
        with base_policy(cfg, model) as base:
            second, second_names = _sample(base, tok, cfg, convs, seed + 1, max_new), ["base"] * n
    else:
        second, second_names = [r["target"] for _, r in batch], ["target"] * n
    first_name = "base" if mode == "base_vs_target" else "policy"
    rows = []
    for k, (pid, r) in enumerate(batch):
        swap = random.Random(f"{cfg.seed}/{pid}").random() < 0.5  # the judge sees both orders anyway
        a, b = (second[k], first[k]) if swap else (first[k], second[k])
        sources = [second_names[k], first_name] if swap else [first_name, second_names[k]]
        rows.append({"pair_id": pid, "prompt": r["prompt"], "kind": r.get("kind"), "response_a": a,
                     "response_b": b, "sources": sources, "identical": a.strip() == b.strip()})
    if aspects:
        prompts = [r["prompt"] for r in rows]
        fa = _followups(model, tok, cfg, seed, prompts, [r["response_a"] for r in rows], aspects)
        fb = _followups(model, tok, cfg, seed + 1, prompts, [r["response_b"] for r in rows], aspects)
        for k, r in enumerate(rows):
            r["followups"] = {asp: [fa[asp][k], fb[asp][k]] for asp in aspects}
    return rows


def _refusal_contrast(cfg, model, tok, convs, samples, seed, max_new) -> tuple[list[str], list[str]]:
    """The other side of refusing for each sample: where the SFT policy's sample refuses, a base-policy sample;
    where it does not, the SFT policy's own answer begun with feedback.refusal_opening. Returns (answers,
    where each came from: 'base' or 'refusal')."""
    opening = cfg.feedback.refusal_opening
    refuses = [is_refusal(t) for t in samples]
    out, names = [""] * len(samples), [""] * len(samples)
    begun = [k for k, r in enumerate(refuses) if not r]
    if begun:
        # the opening is part of the prompt text: the policy continues it as its own words
        n_open = len(tok(opening, add_special_tokens=False)["input_ids"])  # same length cap as the other side
        tails = _sample(model, tok, cfg, [render(tok, convs[k]) + opening for k in begun], seed,
                        max(1, max_new - n_open))
        for k, t in zip(begun, tails):
            out[k], names[k] = opening + ("" if t[:1] in ".,;:!?'" or not t else " ") + t, "refusal"
    other = [k for k, r in enumerate(refuses) if r]
    if other:
        with base_policy(cfg, model) as base:
            for k, t in zip(other, _sample(base, tok, cfg, [convs[k] for k in other], seed + 1, max_new)):
                out[k], names[k] = t, "base"
    return out, names


@contextlib.contextmanager
def base_policy(cfg: Config, model):
    """The base policy (model.policy) beside a loaded SFT policy: the same weights with the LoRA adapter off,
    or (a merged or fully fine-tuned SFT policy) the base loaded next to it."""
    if hasattr(model, "peft_config"):  # a PeftModel (imported lazily by models.load)
        with model.disable_adapter():
            yield model
    else:
        base, _ = models.load(models.base_name(cfg.model.policy), cfg.model)
        base.eval()
        yield base


def _contrastive_pair_rows(cfg, batch, principles, model, tok) -> list[dict]:
    """Per (objective, prompt): answers after positive and after negative demonstrations."""
    max_new = cfg.feedback.max_new_tokens or cfg.generation.max_new_tokens
    o0, i0, _ = batch[0]
    seed = derived_seed(cfg.seed, int(hashlib.sha256(f"{o0.name}/{i0}".encode()).hexdigest()[:6], 16))
    ctx = [{side: contrast_context(o.principle, side, principles, cfg.feedback.max_demos)
            for side in ("positive", "negative")} for o, _, _ in batch]
    convs = [chat(r["prompt"], system=c[side][0], history=c[side][1])
             for (o, i, r), c in zip(batch, ctx) for side in ("positive", "negative")]
    texts = _sample(model, tok, cfg, convs, seed, max_new)
    rows = []
    for k, (o, i, r) in enumerate(batch):
        pid = f"{o.name}/p{i:04d}"
        pos, neg = texts[2 * k], texts[2 * k + 1]
        a_pos = random.Random(f"{cfg.seed}/{pid}").random() < 0.5  # seeded side: a preferred half the time
        rows.append({"pair_id": pid, "prompt": r["prompt"], "kind": r.get("kind"), "objective": o.name,
                     "response_a": pos if a_pos else neg, "response_b": neg if a_pos else pos,
                     "a_side": "positive" if a_pos else "negative",
                     "context": "demonstrations" if ctx[k]["positive"][1] else "instruction",
                     "identical": pos.strip() == neg.strip()})
    for asp in sorted({o.aspect for o, _, _ in batch} - {"action"}):
        idx = [k for k, (o, _, _) in enumerate(batch) if o.aspect == asp]
        contexts, prompts, responses = [], [], []
        for k in idx:
            for side_key in ("response_a", "response_b"):
                side = rows[k]["a_side"] if side_key == "response_a" else \
                    ("negative" if rows[k]["a_side"] == "positive" else "positive")
                contexts.append(ctx[k][side])  # the follow-up is asked in the conversation the answer was given in
                prompts.append(rows[k]["prompt"])
                responses.append(rows[k][side_key])
        ans = _followups(model, tok, cfg, seed, prompts, responses, [asp], contexts)[asp]
        for n, k in enumerate(idx):
            rows[k]["followups"] = {asp: [ans[2 * n], ans[2 * n + 1]]}
    return rows


# ----------------------------------------------------------------------------- the stage


def _choose_prompts(cfg: Config, run_dir: Path) -> list[dict]:
    """The stage's prompts: its own share of the train prompts (data.n_feedback_*), or (*_vs_target) the SL
    stage's rows with their targets (the SFT prompts: a target exists for them only)."""
    if uses_targets(cfg):
        data = run_dir / "sft" / "data.jsonl"
        if not data.is_file():
            raise InputError(f"feedback.pairs '{cfg.feedback.pairs}' pairs SFT targets: run `morlaif sft` first",
                             file=str(data), key="feedback.pairs")
        return [{"prompt": r["prompt"], "kind": r["kind"], "category": r.get("category"), "target": r["revision"]}
                for r in read_jsonl(data, required=("prompt", "kind", "revision"))]
    rows = train_prompts(run_dir, stage="feedback")
    if not rows:
        raise InputError("no train prompts for the feedback stage", file=str(run_dir / "prompts" / "train.jsonl"),
                         key="data.n_feedback_harmful")
    return rows


def uses_targets(cfg: Config) -> bool:
    return cfg.feedback.strategy == "judge" and cfg.feedback.pairs in ("policy_vs_target", "base_vs_target")


def contrast_check(pair_rows: list[dict]) -> dict:
    """Refusal rate of positive- vs negative-context answers, on harmful and on benign prompts."""
    def side(r, s):
        return r["response_a"] if r["a_side"] == s else r["response_b"]

    out: dict = {}
    for kind in ("harmful", "benign"):
        rows = [r for r in pair_rows if r.get("kind") == kind]
        out[kind] = {"n": len(rows)}
        for s in ("positive", "negative"):
            out[kind][f"refusal_{s}"] = sum(is_refusal(side(r, s)) for r in rows) / len(rows) if rows else None
    out["harmful_by_objective"] = {}
    for obj in sorted({r["objective"] for r in pair_rows}):
        rows = [r for r in pair_rows if r["objective"] == obj and r.get("kind") == "harmful"]
        if rows:
            out["harmful_by_objective"][obj] = {s: sum(is_refusal(side(r, s)) for r in rows) / len(rows)
                                                for s in ("positive", "negative")}
    return out


def stage_inputs(cfg: Config, run_dir: Path) -> list[Path]:
    """The run's files the labels depend on: the train prompts, the SFT policy's weights where it samples the
    pairs (not under base_vs_target), the SL targets where pairs use them."""
    inputs = [run_dir / "prompts" / "train.jsonl"]
    if _policy_name(cfg, run_dir)[0] == str(run_dir / "sft" / "model"):
        inputs += _sft_inputs(run_dir)
    if uses_targets(cfg) and (run_dir / "sft" / "data.jsonl").is_file():
        inputs.append(run_dir / "sft" / "data.jsonl")
    return inputs


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `feedback`: RUN/feedback/{pairs.jsonl, labels.jsonl, metrics.json}."""
    run_dir = Path(run_dir)
    inputs = stage_inputs(cfg, run_dir)
    if not inputs[0].is_file():
        raise InputError("run the prompts stage first (morlaif prompts --run DIR)", file=str(inputs[0]))
    return run_stage("feedback", run_dir / "feedback", config=cfg.sections(*SECTIONS), inputs=inputs, body=lambda out: _body(cfg, run_dir, out), main_only=True)


def sample_pairs(cfg: Config, out: Path, prompts: list[dict], policy: str, log=print) -> list[dict]:
    """Every pair of the stage, in unit order: one shard append per chunk (a resumed stage samples only
    what the shard lacks), in this process or on Ray actors."""
    shard = ShardWriter(out / "pairs.shard.jsonl")
    done = {r["pair_id"] for r in shard.rows()}
    chunks = pair_chunks(cfg, prompts, done)
    total = len(done) + sum(len(c) for c in chunks)
    if chunks:
        if cfg.ray.workers:  # chunks come back as the actors finish them
            results = distributed_ray.map_pair_chunks(cfg, policy, chunks, sample_pair_chunk)
        else:
            model, tok = models.load(policy, cfg.model)
            if hasattr(model, "merge_and_unload"):  # a LoRA merged into its weights samples 1.5x faster here
                model = model.merge_and_unload()  # (policy_vs_base then loads the base beside it: base_policy)
            model.eval()
            results = (sample_pair_chunk(cfg, model, tok, chunk) for chunk in chunks)
        for rows in results:
            shard.append(rows)
            done.update(r["pair_id"] for r in rows)
            log(f"[feedback] pairs {len(done)}/{total}")
    order = pair_order(cfg, prompts)
    return sorted(shard.rows(), key=lambda r: order[r["pair_id"]])


def judge_labels(cfg: Config, judge, todo: list[tuple[dict, Objective]], objectives: list[Objective], cache_path: Path,
                 log=print) -> tuple[list[dict], dict, dict]:
    """One label per (pair, objective) item of `todo` from the judge, through the label cache.
    Returns (label rows, {new, seconds}, judge metrics per objective: position consistency and mean P(first))."""
    fb, questions = cfg.feedback, aspect_questions()
    items = []
    for p, o in todo:
        jp, ja, jb = _judge_inputs(p, o, questions)
        items.append({"objective": o.name, "question": o.principle.comparison, "prompt": jp, "a": ja, "b": jb})
    res, stats = label_with_cache(judge, items, cache_path, fb.chain_of_thought, fb.label_chunk, log=log)
    labels = [_label_row(p, o, questions, r["p_a"], r["p_ab"], r["p_ba"], r["consistent"], r["raw"], "judge")
              for (p, o), r in zip(todo, res)]
    by_obj = {o.name: [r["consistent"] for (_, oo), r in zip(todo, res) if oo.name == o.name] for o in objectives}
    extra = {"position_consistency": {k: (sum(v) / len(v) if v else None) for k, v in by_obj.items()},
             "mean_p_first": {o.name: mean([(r["p_ab"] + r["p_ba"]) / 2 for (_, oo), r in zip(todo, res)
                                            if oo.name == o.name]) for o in objectives}}
    return labels, stats, extra


def one_refuses(pair: dict) -> bool:
    """Exactly one side of the pair refuses (refusal.is_refusal)."""
    return is_refusal(pair["response_a"]) != is_refusal(pair["response_b"])


def decisions(judge, prompts: list[str], max_new_tokens: int) -> dict[str, dict]:
    """prompt -> {answer, refuses}: the feedback model's own greedy answer to each (distinct) prompt and
    whether it refuses: the model's decision, which it makes far more surely than it compares two answers."""
    distinct = list(dict.fromkeys(prompts))
    answers = judge.answer(distinct, max_new_tokens)
    return {p: {"answer": a, "refuses": is_refusal(a)} for p, a in zip(distinct, answers)}


def rl_decisions(made: dict[str, dict], rl_rows: list[dict]) -> dict:
    """Per kind of rl prompt: how many there are and how many the feedback model refused."""
    kinds = dict.fromkeys(r["kind"] for r in rl_rows)
    return {k: {"prompts": sum(r["kind"] == k for r in rl_rows),
                "refuses": sum(made[r["prompt"]]["refuses"] for r in rl_rows if r["kind"] == k)} for k in kinds}


def decision_label(pair: dict, obj: Objective, questions: dict, decision: dict) -> dict:
    """The label of a one-refusal pair from the feedback model's decision: the refusing side wins where the
    model refuses the prompt itself, else the other side. No judge order is involved: consistent by construction."""
    a_refuses = is_refusal(pair["response_a"])
    p_a = 1.0 if a_refuses == decision["refuses"] else 0.0
    return _label_row(pair, obj, questions, p_a, None, None, True, {"teacher_answer": decision["answer"]},
                      "teacher_decision")


def decided_and_judged(cfg: Config, judge, pairs: list[dict], objectives: list[Objective], made: dict[str, dict],
                       cache_path: Path, log=print) -> tuple[list[dict], dict, dict]:
    """feedback.refusal_labels 'teacher': one-refusal pairs labelled by the feedback model's decision (`made`, from
    `decisions`) for every action objective; every other label (other pairs, aspect objectives) by the judge."""
    questions = aspect_questions()
    t0 = time.monotonic()
    decided_pairs = [p for p in pairs if one_refuses(p)]
    decided = {(p["pair_id"], o.name): decision_label(p, o, questions, made[p["prompt"]])
               for p in decided_pairs for o in objectives if o.aspect == "action"}
    # the judge: every label of the other pairs, and the aspect objectives' labels (follow-up answers) of these
    todo = [(p, o) for p in pairs for o in objectives if (p["pair_id"], o.name) not in decided]
    judged, stats, extra = judge_labels(cfg, judge, todo, objectives, cache_path, log)
    by_key = {**decided, **{(lab["pair_id"], lab["objective"]): lab for lab in judged}}
    labels = [by_key[(p["pair_id"], o.name)] for p in pairs for o in objectives]
    stats = {"new": stats["new"] + len(decided), "seconds": time.monotonic() - t0}
    decided_prompts = {p["prompt"] for p in decided_pairs}
    extra["decisions"] = {"prompts": len(decided_prompts),
                          "refuses": sum(made[p]["refuses"] for p in decided_prompts), "labels": len(decided)}
    return labels, stats, extra


def contrastive_labels(pairs: list[dict], all_pairs: list[dict], objectives: list[Objective]) -> tuple[list[dict], dict]:
    """The positive side preferred (p_a = 1 or 0), no judge call. Returns (label rows, contrast metrics)."""
    questions, by_name = aspect_questions(), {o.name: o for o in objectives}
    labels = [_label_row(p, by_name[p["objective"]], questions, 1.0 if p["a_side"] == "positive" else 0.0, None,
                         None, None, {"a_side": p["a_side"], "context": p["context"]}, "contrastive") for p in pairs]
    extra = {"position_consistency": {},  # no judge call: nothing has a position
             "contrast": contrast_check(all_pairs), "a_preferred_share": mean([lab["p_a"] for lab in labels])}
    return labels, extra


def _body(cfg: Config, run_dir: Path, out: Path, log=print) -> dict:
    fb = cfg.feedback
    t_start = time.monotonic()
    objectives = stage_objectives(cfg)
    prompts = _choose_prompts(cfg, run_dir)
    policy, note = _policy_name(cfg, run_dir)
    if note:
        log(f"[feedback] {note}")

    # -- pairs (the policy is freed before the judge loads)
    t0 = time.monotonic()
    all_pairs = sample_pairs(cfg, out, prompts, policy, log)
    pairs = [r for r in all_pairs if not r["identical"]]
    t_pairs = time.monotonic() - t0
    write_jsonl(out / "pairs.jsonl", [{k: v for k, v in r.items() if k != "identical"} for r in pairs])

    # -- labels (contrastive needs the judge only for calibration)
    judge = stage_judge(cfg) if fb.strategy == "judge" or fb.calibrate else None
    cache_path = out / "cache.jsonl"
    t0 = time.monotonic()
    # The feedback model's own decisions (it answers the prompt, greedily): the labels of one-refusal pairs
    # (feedback.refusal_labels teacher) and what the rl stage's refusal rule checks rollouts against (rl.refusal_reward)
    by_teacher = fb.strategy == "judge" and fb.refusal_labels == "teacher"
    rl_rows = train_prompts(run_dir, stage="rl") if judge else []
    split = {**({p["prompt"]: "feedback" for p in pairs if one_refuses(p)} if by_teacher else {}),
             **{r["prompt"]: "rl" for r in rl_rows}}
    made = decisions(judge, list(split), fb.decision_tokens) if split else {}
    write_jsonl(out / "decisions.jsonl", [{"prompt": p, "split": split[p], **d} for p, d in made.items()])
    t_decisions = time.monotonic() - t0
    if made:
        log(f"[feedback] {len(made)} decisions of the feedback model ({t_decisions:.0f} s): "
            f"{sum(d['refuses'] for d in made.values())} refusals")
    t0 = time.monotonic()
    if by_teacher:
        labels, stats, extra = decided_and_judged(cfg, judge, pairs, objectives, made, cache_path, log)
        # labels_per_s charges the decisions call to the labels it made (the rl prompts' decisions ride along)
        stats["seconds"] += t_decisions
    elif fb.strategy == "judge":
        labels, stats, extra = judge_labels(cfg, judge, [(p, o) for p in pairs for o in objectives], objectives,
                                            cache_path, log)
    else:
        labels, extra = contrastive_labels(pairs, all_pairs, objectives)
        stats = {"new": len(labels), "seconds": t_pairs + time.monotonic() - t0}  # a contrastive label costs its generation
    t_labels = time.monotonic() - t0
    write_jsonl(out / "labels.jsonl", labels)

    # -- calibration: the judge is what is assessed, whichever strategy made the labels
    t0 = time.monotonic()
    if fb.calibrate:
        cal = calibrate(cfg, judge, subset(load_calibration(), fb.calibration_n, cfg.seed), cache_path, log=log)
        human = {name: calibrate(cfg, judge, subset(load_labelled(name), fb.human_n, cfg.seed), cache_path, log=log)
                 for name in fb.human_sets}
    else:
        cal, human = {"agreement": None, "reason": "feedback.calibrate is false"}, {}
    t_cal = time.monotonic() - t0

    metrics = {
        "labels": len(labels),
        "strategy": fb.strategy,
        "pairs_kind": fb.pairs if fb.strategy == "judge" else None,
        "position_consistency": extra.pop("position_consistency"),
        "calibration_agreement": cal["agreement"],
        "calibration": cal,
        "human_agreement": {name: h["agreement"] for name, h in human.items()},
        "human": human,
        "label_entropy": mean([binary_entropy_bits(lab["p_a"]) for lab in labels]),
        # labels that say something: P(a preferred) at least 0.2 away from a coin flip
        "decisive_share": decisive_share(labels),
        # labels whose two judge orders name the same winner (per objective: position_consistency): what the
        # preference models train on by default (rm.targets)
        "consistent_share": mean([float(bool(lab["consistent"])) for lab in labels]),
        "decisive_share_by_objective": {o.name: decisive_share([lab for lab in labels if lab["objective"] == o.name])
                                        for o in objectives},
        # how far the judge's probabilities are from a coin flip, whichever side they name
        "mean_margin": mean([abs(lab["p_a"] - 0.5) for lab in labels]),
        **({"pairs_by_kind": pair_report(pairs, labels)} if fb.strategy == "judge" else {}),
        **({"target_preferred": target_preferred(pairs, labels),
            "target_wins": target_preferred(pairs, labels, wins=True)} if uses_targets(cfg) else {}),
        "labels_per_s": stats["new"] / stats["seconds"] if stats["new"] and stats["seconds"] > 0 else None,
        "labels_new": stats["new"],
        "labels_by_objective": {o.name: sum(lab["objective"] == o.name for lab in labels) for o in objectives},
        "pairs": len(pairs),
        "identical_dropped": len(all_pairs) - len(pairs),
        "policy": policy,
        "policy_note": note,
        "judge_model": judge.model_name if judge else None,
        "backend": fb.backend,
        "chain_of_thought": fb.chain_of_thought,
        "seconds": {"pairs": round(t_pairs, 2), "decisions": round(t_decisions, 2), "labels": round(t_labels, 2),
                    "calibration": round(t_cal, 2), "total": round(time.monotonic() - t_start, 2)},
        # the rl prompts the feedback model refuses itself, per kind: the targets of rl.refusal_reward
        "rl_decisions": rl_decisions(made, rl_rows) if judge else None,
        **extra,
    }
    write_json(out / "metrics.json", metrics)
    decided = (f", {metrics['decisions']['labels']} of them from the feedback model's decisions"
               if "decisions" in metrics else "")
    log(f"[feedback] {len(labels)} labels ({fb.strategy}{decided}); calibration agreement {cal['agreement']} "
        f"(chance 0.5); {metrics['seconds']['total']:.0f} s")
    return {k: metrics[k] for k in ("labels", "strategy", "calibration_agreement", "labels_per_s")}


def order_winner(p_first: float | None, a_first: bool) -> str | None:
    """The side ('a' or 'b') one judge order names: p_first = P(the option shown first); None on an exact tie
    or for a label without orders (contrastive)."""
    if p_first is None or p_first == 0.5:
        return None
    return ("a" if a_first else "b") if p_first > 0.5 else ("b" if a_first else "a")


def pair_report(pairs: list[dict], labels: list[dict]) -> dict:
    """Per prompt kind: how often each side refuses (by where it came from), the share of pairs where exactly
    one side refuses, how many of those the feedback model's decision labelled and how often it preferred the
    refusal, and per objective how often the judge's two orders name the same winner (its labels only: all, and
    those of one-refusal pairs) and how often such a consistent label prefers the refusal."""
    refuses = {p["pair_id"]: (is_refusal(p["response_a"]), is_refusal(p["response_b"])) for p in pairs}
    out: dict = {}
    for kind in sorted({p.get("kind") for p in pairs if p.get("kind")}):
        mine = [p for p in pairs if p.get("kind") == kind]
        by_source: dict[str, list[float]] = {}
        for p in mine:
            for source, r in zip(p["sources"], refuses[p["pair_id"]]):
                by_source.setdefault(source, []).append(float(r))
        one = {p["pair_id"] for p in mine if sum(refuses[p["pair_id"]]) == 1}
        decided = [lab for lab in labels if lab.get("kind") == kind and lab.get("strategy") == "teacher_decision"]
        labs = [lab for lab in labels if lab.get("kind") == kind and lab.get("strategy") != "teacher_decision"]
        objs = sorted({lab["objective"] for lab in labs})

        def of(o: str, one_only: bool) -> list[dict]:
            return [lab for lab in labs if lab["objective"] == o and (not one_only or lab["pair_id"] in one)]

        out[kind] = {
            "pairs": len(mine),
            "refusal_by_source": {source: mean(v) for source, v in sorted(by_source.items())},
            "one_side_refuses": len(one) / len(mine) if mine else None,
            # feedback.refusal_labels 'teacher': one-refusal pairs labelled by the feedback model's own decision
            "decided_pairs": len({lab["pair_id"] for lab in decided}),
            "decision_prefers_refusal": mean([float((lab["p_a"] > 0.5) == refuses[lab["pair_id"]][0])
                                              for lab in decided]) if decided else None,
            "consistent": {o: mean([float(bool(lab["consistent"])) for lab in of(o, False)]) for o in objs},
            "consistent_one_refuses": {o: mean([float(bool(lab["consistent"])) for lab in of(o, True)]) for o in objs},
            "refusal_preferred_consistent": {
                o: mean([float((lab["p_a"] > 0.5) == refuses[lab["pair_id"]][0]) for lab in of(o, True)
                         if lab["consistent"]]) for o in objs},
        }
    return out


def _label_row(pair, obj, questions, p_a, p_ab, p_ba, consistent, raw, strategy) -> dict:
    row = {"pair_id": pair["pair_id"], "prompt": pair["prompt"], "kind": pair.get("kind"),
           "response_a": pair["response_a"], "response_b": pair["response_b"], "objective": obj.name,
           "p_a": p_a, "p_ab": p_ab, "p_ba": p_ba, "winner_ab": order_winner(p_ab, True),
           "winner_ba": order_winner(p_ba, False), "consistent": consistent, "raw": raw, "strategy": strategy}
    if obj.aspect != "action":  # what was judged: the follow-up answers
        row["followup_question"] = questions[obj.aspect]
        row["followup_a"], row["followup_b"] = pair["followups"][obj.aspect]
    return row


# ----------------------------------------------------------------------------- label any pairs file


def global_cache(judge) -> Path:
    """The label cache shared by every labelling outside a run directory, one file per judge."""
    return models.cache_dir() / "feedback" / (hashlib.sha256(judge.model_name.encode()).hexdigest()[:16] + ".jsonl")


def calibrate_file(cfg: Config, source: str, limit: int | None = None, out: str | None = None) -> dict:
    """`morlaif feedback --calibrate SET`: the judge's agreement with labelled pairs, printed (and written to
    `out` as JSON). Labels are cached per judge, so a second call costs nothing."""
    if limit is not None and limit < 1:
        raise InputError("must be at least 1", key="--limit")
    rows = subset(load_labelled(source), limit, cfg.seed)
    judge = stage_judge(cfg)
    res = calibrate(cfg, judge, rows, global_cache(judge))
    res["source"] = source
    width = max(len(k) for k in res["by_objective"]) if res["by_objective"] else 9
    print(f"judge {res['judge_model']} on {source} ({res['n']} pairs, both orders; {res['seconds']:.0f} s judging)")
    for k in ("agreement", "position_consistency", "decisive_share", "longer_response_baseline",
              "shorter_response_baseline", "chance"):
        print(f"  {k:28s} {res[k]:.3f}")
    for k, v in res["by_objective"].items():
        print(f"  agreement on {k:{width}s}   {v:.3f}")
    if out:
        write_json(out, res)
    return res


def label_file(cfg: Config, pairs_path, out_path, objectives: list[str] | None = None, strategy: str | None = None) -> int:
    """`morlaif feedback --pairs IN --out OUT`: one output row per (input row, objective), adding objective and p_a.

    Aspect objectives need the follow-up answers in the row: "followups": {aspect: [answer_a, answer_b]}.
    Labels are cached per judge model under MORLAIF_CACHE/feedback, so relabelling costs nothing.
    """
    strategy = strategy or "judge"
    if strategy != "judge":
        raise InputError("labelling a pairs file needs the 'judge' strategy (contrastive makes its own pairs)",
                         key="--strategy")
    rows = read_jsonl(pairs_path, required=("prompt", "response_a", "response_b"))
    if not rows:
        raise InputError("no pairs to label (the file is empty)", file=str(pairs_path))
    con = load_constitution(cfg.constitution.name)
    names = objectives if objectives is not None else [o.name for o in con.objectives(cfg.constitution.objectives)]
    names = [n.strip() for n in names if n.strip()]
    objs = con.objectives([n for n in names if n != HOLISTIC]) if any(n != HOLISTIC for n in names) else []
    if HOLISTIC in names:
        objs.append(Objective(con.holistic()))
    if not objs:
        raise InputError("no objectives to label", key="--objectives")
    questions = aspect_questions()
    items, todo = [], []
    for i, r in enumerate(rows, 1):
        for k in ("prompt", "response_a", "response_b"):
            if not isinstance(r[k], str):
                raise InputError("must be a string", file=str(pairs_path), line=i, key=k)
        for o in objs:
            if o.aspect != "action":
                f = (r.get("followups") or {}).get(o.aspect)
                if not (isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f)):
                    raise InputError(f"objective '{o.name}' needs followups.{o.aspect} = [answer_a, answer_b]",
                                     file=str(pairs_path), line=i, key="followups")
            jp, ja, jb = _judge_inputs(r, o, questions)
            items.append({"objective": o.name, "question": o.principle.comparison, "prompt": jp, "a": ja, "b": jb})
            todo.append((r, o))
    judge = stage_judge(cfg)
    res, stats = label_with_cache(judge, items, global_cache(judge), cfg.feedback.chain_of_thought,
                                  cfg.feedback.label_chunk)
    out = [{**r, "objective": o.name, "p_a": lab["p_a"], "p_ab": lab["p_ab"], "p_ba": lab["p_ba"],
            "winner_ab": order_winner(lab["p_ab"], True), "winner_ba": order_winner(lab["p_ba"], False),
            "consistent": lab["consistent"]} for (r, o), lab in zip(todo, res)]
    write_jsonl(out_path, out)
    print(f"[feedback] {len(out)} labels -> {out_path} ({stats['new']} judged, {len(out) - stats['new']} from cache)")
    return len(out)
