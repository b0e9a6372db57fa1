"""Stage `sft`: Constitutional AI's supervised stage (SL-CAI), then LoRA SFT on the revisions.

Who writes what (`model.critic`, default the feedback model: the embedded 1.5B teacher):
- the *initial* answers to the red-team and benign train prompts: the critic (`sft.initial:
  critic`, the default) or the policy itself (`sft.initial: policy`, Constitutional AI's setting);
- for `sft.rounds` rounds on each red-team prompt, the critic critiques the latest answer against
  a principle of the constitution (a follow-up user turn in the same conversation, template
  data/templates/critique.txt) and revises it in the next turn (revision.txt). The final
  revision becomes the SFT target for the plain prompt;
- benign prompts keep their initial answers (`data.n_sft_benign` of them), so the
  student also learns to answer well when nothing is wrong, not that every request deserves a refusal.
With `model.critic` set to the policy and `sft.initial: policy` the policy critiques and revises
itself, as in Constitutional AI (useful when the policy is strong; a 135M model's critiques are
noise, which is why the embedded default is teacher-supervised).

Option `sft.context_distillation`: small models follow examples, not instructions, so the target
is instead the initial writer's answer after the drawn principle's positive demonstrations as
few-shot turns, trained on the prompt *without* them.

Degenerate targets (empty, looping, a copy of the initial answer, of the prompt, of the
template or of the critique) are dropped and counted by reason.

Generation writes one append-only shard row per prompt (sft/generations.jsonl), batch by
batch, so an interrupted run resumes without regenerating finished prompts. Training is
short and is simply redone on resume.

Writes sft/data.jsonl, sft/dropped.jsonl, sft/model/ (LoRA adapter, or the whole model with
sft.use_peft false, + tokenizer + model card), sft/metrics.json, sft/tensorboard/ (logging.report_to)
and the manifest.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from morlaif import generation, models, training
from morlaif.artifacts import ShardWriter, atomic_write_text, iter_batches, read_jsonl, write_json, write_jsonl
from morlaif.config import Config, derived_seed
from morlaif.constitution import Principle, configured_objectives, load_template
from morlaif.errors import InputError
from morlaif.judge import judge_model_name
from morlaif.lifecycle import run_stage
from morlaif.processes import is_main_process, per_process, wait_for_everyone
from morlaif.promptsets import train_prompts
from morlaif.refusal import is_refusal, refusal_rate
from morlaif.stats import mean

# A target sharing at least this share of its word 5-grams with a reference text (template,
# critique) was copied from it rather than written as an answer. 5 words: long enough that
# stock phrases ("I can't help with that") do not trigger it alone.
COPY_NGRAM = 5
COPY_SHARE = 0.5

# --------------------------------------------------------------------------- pure helpers


def words(text: str) -> list[str]:
    """Lower-cased word tokens: the unit of every filter (robust to spacing and punctuation)."""
    return re.findall(r"[\w']+", text.lower())


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def repeat_share(text: str, n: int) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (0 = no repeats; 0 when < n words)."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def copy_share(text: str, reference: str, n: int = COPY_NGRAM) -> float:
    """Share of `text`'s word n-grams found in `reference`. Texts shorter than n words: 1.0 when the
    whole text occurs in the reference, else 0.0."""
    ws = words(text)
    if not ws:
        return 0.0
    if len(ws) < n:
        return 1.0 if f" {' '.join(ws)} " in f" {' '.join(words(reference))} " else 0.0
    ref = set(ngrams(words(reference), n))
    grams = ngrams(ws, n)
    return sum(g in ref for g in grams) / len(grams)


def similarity(a: str, b: str) -> float:
    """difflib ratio of the word-normalised texts (1.0 = same words in the same order)."""
    return difflib.SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


_LABEL = re.compile(r"^\s*(?:revised answer|revised response|revision|answer|response)\s*:\s*", re.IGNORECASE)
_NEXT_SECTION = re.compile(r"\n\s*(?:critique|verdict|question|example|revised answer)\s*:", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """Strip a leading label the model echoes from the template ("Revised answer:") and cut any
    section it goes on to invent ("Critique: ...", "Verdict: ..."): the answer is what stays."""
    text = _LABEL.sub("", text.strip(), count=1)
    m = _NEXT_SECTION.search(text)
    if m:
        text = text[: m.start()]
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_verdict(critique: str) -> str | None:
    """The text after the last "Verdict:" in a critique, or None when the model gave none."""
    found = re.findall(r"verdict\s*:\s*([^\n]*)", critique, flags=re.IGNORECASE)
    return found[-1].strip() if found else None


def degenerate_reason(
    revision: str,
    *,
    initial: str | None = None,
    prompt: str | None = None,
    templates: tuple[str, ...] = (),
    critique: str | None = None,
    ngram: int = 3,
    max_repeat: float = 0.3,
    copy_ratio: float = 0.95,
) -> str | None:
    """Why `revision` is no usable SFT target, or None. First matching reason wins, in this order:
    empty, repetition, copy_of_initial, copy_of_prompt, copy_of_template, copy_of_critique."""
    if not words(revision):
        return "empty"
    if repeat_share(revision, ngram) > max_repeat:
        return "repetition"
    if initial is not None and similarity(revision, initial) >= copy_ratio:
        return "copy_of_initial"
    if prompt is not None and similarity(revision, prompt) >= copy_ratio:
        return "copy_of_prompt"
    if any(copy_share(revision, t) >= COPY_SHARE for t in templates):
        return "copy_of_template"
    if critique and copy_share(revision, critique) >= COPY_SHARE:
        return "copy_of_critique"
    return None


def plan_principles(prompt: str, names: list[str], rounds: int, selection: str, seed: int) -> list[str]:
    """Principles for a prompt's critique/revision rounds.

    'each': every principle in turn. 'random': drawn with a generator seeded by (seed, prompt),
    so the plan of a prompt does not depend on which other prompts are in the run or on resume;
    without repeats while rounds <= #principles.
    """
    if selection == "each":
        return list(names)
    rng = random.Random(f"{seed}:{prompt}")
    return rng.sample(names, rounds) if rounds <= len(names) else [rng.choice(names) for _ in range(rounds)]


def demonstration_turns(principle: Principle, principles: list[Principle], shots: int) -> list[dict]:
    """Few-shot user/assistant turns for context distillation: the principle's positive
    demonstrations first, then the other principles' in constitution order, up to `shots` pairs."""
    demos = list(principle.demonstrations.get("positive", []))
    for p in principles:
        if p.name != principle.name:
            demos += p.demonstrations.get("positive", [])
    turns: list[dict] = []
    for d in demos[:shots]:
        turns += [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["response"]}]
    if not turns:
        raise InputError("context distillation needs positive demonstrations in the constitution",
                         key="sft.context_distillation")
    return turns


# --------------------------------------------------------------------------- generation


def critic_name(cfg: Config) -> str:
    """The model that critiques and revises: model.critic, else the feedback model."""
    return cfg.model.critic or judge_model_name(cfg)


class Writers:
    """The models that write the SL-CAI rows, each loaded on first use and once per name: `policy`
    (the model being aligned, in its training dtype) and `critic` (inference dtype)."""

    def __init__(self, cfg: Config):
        self.cfg, self.loaded = cfg, {}
        self.names = {"policy": cfg.model.policy, "critic": critic_name(cfg)}

    def __call__(self, role: str):
        name = self.names[role]
        if name not in self.loaded:
            if name == self.names["policy"]:
                model, tok = models.load(name, self.cfg.model, load_in_4bit=self.cfg.model.load_in_4bit)
            else:
                model, tok = models.load_teacher(name, self.cfg.model)
            self.loaded[name] = (model.eval(), tok)
        return self.loaded[name]

    def policy_if_loaded(self):
        return self.loaded.get(self.names["policy"], (None, None))


def _gen(cfg: Config, writer, convs: list, max_new_tokens: int, seed: int, desc: str) -> list[str]:
    model, tok = writer
    s = generation.Sampling.from_config(cfg, "sft_target").replace(max_new_tokens=max_new_tokens)
    return generation.generate(model, tok, convs, **s.kwargs(), seed=seed, desc=desc)


def _turns(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def generate_chunk(cfg: Config, writers: Writers, items: list[dict], principles: dict[str, Principle],
                   seed: int) -> list[dict]:
    """Initial answers for a chunk of prompts (sft.initial writes them), then critique/revision rounds by
    the critic (or context distillation) for its red-team ones. One row per prompt, in input order."""
    s = cfg.sft
    initial = _gen(cfg, writers(s.initial), [generation.chat(it["prompt"]) for it in items],
                   cfg.generation.max_new_tokens, seed, "initial")
    rows = []
    for it, ans in zip(items, initial):
        row = {"prompt": it["prompt"], "kind": it["kind"], "category": it.get("category"), "initial": ans,
               "writers": {"initial": writers.names[s.initial]}}
        if it["kind"] == "benign":
            row.update(critique=None, revision=ans, principle=None)
        rows.append(row)
    harm = [r for r in rows if r["kind"] == "harmful"]
    if not harm:
        return rows
    if s.rounds == 0 and not s.context_distillation:  # the answers themselves are the targets
        for r in harm:
            r.update(principles=[], critiques=[], revisions=[], raw_revisions=[], principle=None, critique=None,
                     revision=r["initial"], method="answer")
        return rows
    names = list(principles)
    for r in harm:
        r["principles"] = plan_principles(r["prompt"], names, s.rounds, s.principle_selection, cfg.seed)
        r["writers"]["revision"] = writers.names["critic"]
    critic = writers("critic")
    if s.context_distillation:
        # One distilled target per prompt, conditioned on the first drawn principle's demonstrations.
        plist = list(principles.values())
        convs = [generation.chat(r["prompt"], history=demonstration_turns(principles[r["principles"][0]], plist,
                                                                          s.cd_shots)) for r in harm]
        outs = _gen(cfg, writers(s.initial), convs, s.revision_max_new_tokens, seed + 1, "distil")
        for r, o in zip(harm, outs):
            r.update(principles=r["principles"][:1], critiques=[], revisions=[clean_revision(o)], raw_revisions=[o])
            r["writers"]["revision"] = writers.names[s.initial]
    else:
        crit_t, rev_t = load_template("critique.txt"), load_template("revision.txt")
        for r in harm:
            r.update(critiques=[], revisions=[], raw_revisions=[])
        n_rounds = max(len(r["principles"]) for r in harm)
        for k in range(n_rounds):
            current = [r["revisions"][-1] if r["revisions"] else r["initial"] for r in harm]
            # The critique is a follow-up turn after the answer, the revision the turn after the critique:
            # the conversation of Constitutional AI, read by the critic as its own.
            asks = [crit_t.format(critique_request=principles[r["principles"][k]].critique) for r in harm]
            convs = [generation.chat(a, history=_turns(r["prompt"], cur)) for r, a, cur in zip(harm, asks, current)]
            crits = _gen(cfg, critic, convs, s.critique_max_new_tokens, seed + 2 * k + 1, f"critique {k + 1}")
            convs = [generation.chat(rev_t.format(revision_request=principles[r["principles"][k]].revision),
                                     history=_turns(r["prompt"], cur) + [{"role": "user", "content": a},
                                                                         {"role": "assistant", "content": c}])
                     for r, a, c, cur in zip(harm, asks, crits, current)]
            revs = _gen(cfg, critic, convs, s.revision_max_new_tokens, seed + 2 * k + 2, f"revision {k + 1}")
            for r, c, v in zip(harm, crits, revs):
                r["critiques"].append(c)
                r["raw_revisions"].append(v)
                r["revisions"].append(clean_revision(v))
    for r in harm:
        one = len(r["principles"]) == 1
        r["principle"] = r["principles"][0] if one else r["principles"]
        r["critique"] = (r["critiques"][0] if one else r["critiques"]) if r["critiques"] else None
        r["revision"] = r["revisions"][-1]
        r["method"] = "context_distillation" if s.context_distillation else "critique_revision"
    return rows


def filter_rows(cfg: Config, rows: list[dict], principles: dict[str, Principle]) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) with `drop_reason` on dropped rows. Benign answers are checked for emptiness and
    loops only (they are meant to equal their initial answer)."""
    s = cfg.sft
    crit_t, rev_t = load_template("critique.txt"), load_template("revision.txt")
    kept, dropped = [], []
    for r in rows:
        kw = dict(ngram=s.filter_ngram, max_repeat=s.filter_max_repeat, copy_ratio=s.filter_copy_ratio)
        if r["kind"] == "harmful" and r.get("method") != "answer":  # a revision: also no copy of its sources
            last = principles[r["principles"][-1]]
            if r.get("method") == "context_distillation":
                templates = tuple(t["content"] for t in demonstration_turns(last, list(principles.values()), s.cd_shots))
            else:
                templates = (crit_t.format(critique_request=last.critique), rev_t.format(revision_request=last.revision))
            crits = r.get("critiques") or []
            kw.update(initial=r["initial"], prompt=r["prompt"], templates=templates,
                      critique=crits[-1] if crits else None)
        reason = degenerate_reason(r["revision"], **kw) or (refusal_mismatch(r) if s.refusal_filter else None)
        (dropped if reason else kept).append({**r, "drop_reason": reason} if reason else r)
    return kept, dropped


def refusal_mismatch(row: dict) -> str | None:
    """`sft.refusal_filter`: a red-team target that does not refuse, or a benign one that does, by the
    refusal detector eval uses. A 135M student learns from a few dozen rows *whether* to refuse, not
    when: mixed targets (the teacher complied with about a third of the red-team prompts) teach it to
    refuse at random, benign prompts included."""
    refuses = is_refusal(row["revision"])
    if row["kind"] == "harmful" and not refuses:
        return "red_team_target_complies"
    if row["kind"] == "benign" and refuses:
        return "benign_target_refuses"
    return None


# --------------------------------------------------------------------------- stage


def _select_prompts(cfg: Config, run_dir: Path) -> list[dict]:
    """The SL stage's own share of the train prompts (data.n_sft_harmful, data.n_sft_benign)."""
    harmful = train_prompts(run_dir, "harmful", stage="sft")
    if not harmful:
        raise InputError("no harmful train prompts for the SL stage", file=str(run_dir / "prompts" / "train.jsonl"),
                         key="data.n_sft_harmful")
    return harmful + train_prompts(run_dir, "benign", stage="sft")


def _data_row(r: dict) -> dict:
    out = {k: r.get(k) for k in ("prompt", "kind", "category", "initial", "critique", "revision", "principle")}
    if r["kind"] == "harmful":
        out["method"] = r["method"]
        if len(r["revisions"]) > 1:
            out["revisions"] = r["revisions"]  # every round's revision; `revision` is the last
        verdicts = [parse_verdict(c) for c in r["critiques"]]
        out["verdict"] = verdicts[0] if len(verdicts) == 1 else (verdicts or None)
    return out


def train(cfg: Config, model, tok, rows: list[dict], out: Path) -> dict:
    """SFT with TRL's SFTTrainer on conversational rows: a LoRA adapter, or every weight with
    sft.use_peft false. Curves go to the run's tracker (RUN/sft/tensorboard by default); returns loss
    curve and wall time."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    s = cfg.sft
    if s.completion_only_loss:
        # Conversational prompt/completion: TRL masks the prompt, so the loss is on the answer only.
        data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["revision"]}]} for r in rows]
    else:
        data = [{"messages": _turns(r["prompt"], r["revision"])} for r in rows]
    work = out / ".trainer"  # scratch output_dir; nothing is saved there (save_strategy="no") and it is removed
    shutil.rmtree(work, ignore_errors=True)
    training.check_trl_args("sft", s.trl_args)
    tracker = training.Tracker(cfg, out.parent, "sft")
    args = training.trl_config(SFTConfig, "sft", dict(
        output_dir=str(work),
        num_train_epochs=s.epochs,
        per_device_train_batch_size=per_process(s.batch_size, "sft.batch_size"),
        max_length=s.max_length,
        completion_only_loss=s.completion_only_loss,
        logging_steps=1,
        save_strategy="no",
        report_to=tracker.report_to,
        run_name=tracker.run_name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        **training.schedule_arguments(s),
    ), training.precision_arguments(cfg.model), s.trl_args)
    lora = None
    if s.use_peft:
        training.check_lora_targets(model, s.lora_target_modules, "sft.lora_target_modules")
        lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, task_type="CAUSAL_LM",
                          target_modules=s.lora_target_modules)
    elif hasattr(model, "peft_config"):  # a full fine-tune of an adapter policy: of its merged weights
        model = model.merge_and_unload()
    tok.padding_side = "right"  # training pads on the right; generation code sets left again itself
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=lora, callbacks=tracker.trainer_callbacks())
    t0 = time.monotonic()
    try:
        trainer.train()
    finally:
        tracker.close()
    wall = time.monotonic() - t0
    tok.padding_side = "left"
    curve = [{"step": h["step"], "loss": round(h["loss"], 4)} for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(work, ignore_errors=True)
    return {"model": trainer.model, "loss_curve": curve, "train_wall_time_s": round(wall, 2),
            "train_steps": trainer.state.global_step}


def _model_card(cfg: Config, metrics: dict) -> str:
    s = cfg.sft
    m = {k: metrics[k] for k in ("rows", "rows_revised", "rows_benign", "share_revised", "dropped",
                                 "final_loss", "method")}
    hub = models.hub_id(cfg.model.policy)
    what = (f"a LoRA adapter (r={s.lora_r}, alpha={s.lora_alpha}, target modules {s.lora_target_modules})"
            if s.use_peft else "every weight (a full fine-tune)")
    return (
        "---\n"
        + (f"base_model: {hub}\n" if hub else "")
        + f"library_name: {'peft' if s.use_peft else 'transformers'}\n"
        f"tags: [morlaif, constitutional-ai, sl-cai, sft{', lora' if s.use_peft else ''}]\n"
        "---\n\n"
        f"# morlaif SL-CAI policy ({'LoRA adapter' if s.use_peft else 'full fine-tune'})\n\n"
        f"Base model `{cfg.model.policy}`, fine-tuned with TRL's SFTTrainer, training {what}, on Constitutional AI "
        f"supervised rows (constitution `{cfg.constitution.name}`): red-team prompts answered, critiqued and "
        "revised by the base model itself, mixed with benign prompts and their unrevised answers.\n\n"
        "Inside the run this folder names its base the way morlaif does. For a folder plain transformers, PEFT "
        "or vLLM load: `morlaif export --run <run dir> --stage sft --out <dir>` (add `--merge` for one "
        "self-contained model).\n\n"
        "## Figures\n\n```json\n" + json.dumps(m, indent=2) + "\n```\n\n"
        "## Resolved config\n\n```yaml\n" + cfg.to_yaml() + "```\n"
    )


def generate_rows(cfg: Config, out: Path, items: list[dict], principles: dict[str, Principle]) -> Writers:
    """Append the generation rows of the prompts not in out/generations.jsonl yet, one chunk of
    generation.batch_size prompts at a time (fixed chunks over the full list: a resumed chunk keeps
    its seed). Returns the writers, holding whichever models it had to load."""
    shard = ShardWriter(out / "generations.jsonl")
    done = {r["prompt"] for r in shard.rows()}
    todo_total = sum(it["prompt"] not in done for it in items)
    if done:
        print(f"[sft] resuming: {len(items) - todo_total} of {len(items)} prompts already generated")
    writers = Writers(cfg)
    chunks = list(iter_batches(items, cfg.generation.batch_size))
    bar = tqdm(total=todo_total, desc="sft data", unit="prompt", disable=not todo_total)
    for c, chunk in enumerate(chunks):
        todo = [it for it in chunk if it["prompt"] not in done]
        if not todo:
            continue
        rows = generate_chunk(cfg, writers, todo, principles, seed=derived_seed(cfg.seed, 100 * c))
        shard.append(rows)
        done.update(r["prompt"] for r in rows)
        bar.update(len(rows))
    bar.close()
    return writers


def sft_metrics(cfg: Config, tok, rows: list[dict], kept: list[dict], dropped: list[dict], result: dict,
                gen_wall: float) -> dict:
    """sft/metrics.json: rows kept and dropped (by reason), how much revision changed, token lengths, loss."""
    harm = [r for r in rows if r["kind"] == "harmful"]
    kept_h = [r for r in kept if r["kind"] == "harmful"]
    crit_all = [c for r in harm for c in r["critiques"]]
    reasons: dict[str, int] = {}
    for r in dropped:
        reasons[r["drop_reason"]] = reasons.get(r["drop_reason"], 0) + 1

    def mean_tokens(texts: list[str]) -> float | None:
        m = mean([len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts])
        return None if m is None else round(m, 2)

    s = cfg.sft
    method = "context_distillation" if s.context_distillation else "critique_revision" if s.rounds else "answer"
    kept_b = [r for r in kept if r["kind"] == "benign"]
    return {
        "method": method,
        "writers": {"initial": cfg.model.policy if s.initial == "policy" else critic_name(cfg),
                    "critique_revision": critic_name(cfg) if method == "critique_revision" else None},
        # what the student is shown: how often the targets decline (the refusal detector of the eval)
        "refusal_rate": {"initial_harmful": refusal_rate([r["initial"] for r in harm]),
                         "target_harmful": refusal_rate([r["revision"] for r in kept_h]),
                         "target_benign": refusal_rate([r["revision"] for r in kept_b])},
        "rows": len(kept),
        "rows_revised": len(kept_h),
        "rows_benign": len(kept) - len(kept_h),
        "prompts": {"harmful": len(harm), "benign": len(rows) - len(harm)},
        # Over all harmful prompts before filtering: did critique/revision change the answer at all?
        "share_revised": round(sum(similarity(r["revision"], r["initial"]) < 1.0 for r in harm) / len(harm), 4),
        "share_revised_kept": round(sum(similarity(r["revision"], r["initial"]) < 1.0 for r in kept_h)
                                    / len(kept_h), 4) if kept_h else None,
        "dropped": reasons,
        "critique_with_verdict": round(sum(parse_verdict(c) is not None for c in crit_all) / len(crit_all), 4)
        if crit_all else None,
        "mean_tokens": {
            "initial": mean_tokens([r["initial"] for r in harm]),
            "critique": mean_tokens(crit_all),
            "revision": mean_tokens([r["revision"] for r in kept_h]),
            "benign": mean_tokens([r["revision"] for r in kept if r["kind"] == "benign"]),
        },
        "loss_curve": result["loss_curve"],
        "final_loss": result["loss_curve"][-1]["loss"] if result["loss_curve"] else None,
        "train_steps": result["train_steps"],
        "train_wall_time_s": result["train_wall_time_s"],
        "generation_wall_time_s": round(gen_wall, 2),
    }


def _body(cfg: Config, run_dir: Path, out: Path) -> dict:
    """Generate (main process; resumable shards), filter, train (every launched process: TRL's DDP), save."""
    # The SL stage revises toward the principles the run optimises (all of them by default).
    principles = {o.principle.name: o.principle for o in configured_objectives(cfg.constitution)}
    items = _select_prompts(cfg, run_dir)
    main = is_main_process()  # several processes: the main one generates, so one appends to the shard
    t0 = time.monotonic()
    model, tok = generate_rows(cfg, out, items, principles).policy_if_loaded() if main else (None, None)
    wait_for_everyone()  # (the critic, if it was loaded, is freed here with the writers)
    gen_wall = time.monotonic() - t0

    by_prompt = {r["prompt"]: r for r in read_jsonl(out / "generations.jsonl", shard=True)}
    rows = [by_prompt[it["prompt"]] for it in items]
    kept, dropped = filter_rows(cfg, rows, principles)
    if not kept:
        raise InputError("every SFT row was filtered out as degenerate (see sft/dropped.jsonl)", key="sft")
    if main:
        write_jsonl(out / "data.jsonl", [_data_row(r) for r in kept])
        write_jsonl(out / "dropped.jsonl", [{**_data_row(r), "drop_reason": r["drop_reason"]} for r in dropped])

    if model is None:
        model, tok = models.load(cfg.model.policy, cfg.model, load_in_4bit=cfg.model.load_in_4bit)
    result = train(cfg, model, tok, kept, out)
    metrics = sft_metrics(cfg, tok, rows, kept, dropped, result, gen_wall)
    if not main:
        return {}
    if cfg.sft.use_peft:
        models.save_adapter(result["model"], tok, out / "model", base=cfg.model.policy)
    else:
        models.save_model(result["model"], tok, out / "model")
    atomic_write_text(out / "model" / "README.md", _model_card(cfg, metrics))
    write_json(out / "metrics.json", metrics)
    print(f"[sft] {metrics['rows']} rows ({metrics['rows_revised']} red-team, {metrics['rows_benign']} benign), "
          f"share revised {metrics['share_revised']}, dropped {metrics['dropped'] or 'none'}, "
          f"final loss {metrics['final_loss']}")
    return {k: metrics[k] for k in ("rows", "share_revised", "dropped", "final_loss", "train_wall_time_s")}


def run(cfg: Config, run_dir: Path) -> Path:
    """Stage `sft`: SL-CAI data (resumable shards) + LoRA SFT. Returns RUN/sft."""
    run_dir = Path(run_dir)
    train_file = run_dir / "prompts" / "train.jsonl"
    if not train_file.is_file():
        raise InputError("run the prompts stage first (morlaif prompts --run DIR)", file=str(train_file))
    return run_stage("sft", run_dir / "sft", config=cfg.sections("model", "constitution", "generation", "sft"),
                     inputs=[train_file], body=lambda out: _body(cfg, run_dir, out))
