"""Stage `rm`: train one preference (reward) model per objective on the soft AI labels.

The models themselves (loss, adapters and heads, the text they read, `RewardScorer`) are
`morlaif.preference`; this stage fits them, measures them, and writes RUN/rm/.

- `multihead` (cfg.rm.layout): one adapter + K-output head, all objectives trained jointly.
- `separate`: one adapter + 1-output head per objective, trained one after the other.
  Why not TRL's RewardTrainer: it takes hard chosen/rejected pairs and would throw away the soft
  labels (and every p_a = 0.5 tie). Our own loop keeps the soft loss, and `separate` is the very
  same code path as `multihead` with K = 1, so the two layouts differ only in the layout.
- Single-objective baseline: the same K = 1 path on the holistic label (when the labels have it).

Artifacts (RUN/rm/): model/ (PEFT adapters, safetensors, one sub-dir per adapter + tokenizer),
heads.safetensors, objectives.json (layout, objectives, adapters, backbone), norm.json (per-objective
mean/std of the raw reward over the SFT policy's responses in the labelled pairs), metrics.json,
tensorboard/ (logging.report_to: each adapter's loss and learning rate per step).
`morlaif export --stage rm` turns them into AutoModelForSequenceClassification folders.
`morlaif rm --human` (agreement with human labels, fitted weights) is `morlaif.human`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from morlaif import models, preference, training
from morlaif.artifacts import write_json
from morlaif.constitution import HOLISTIC, configured_objectives
from morlaif.errors import InputError
from morlaif.labels import read_labels
from morlaif.lifecycle import run_stage
from morlaif.nonfinite import NonFiniteGuard
from morlaif.preference import BASELINE_ADAPTER, MULTIHEAD_ADAPTER, RewardScorer
from morlaif.processes import (across_processes, gathered_checksums, is_main_process, make_accelerator, mixed_precision,
                               per_process, pick_device, process_slice)
from morlaif.promptsets import load_calibration
from morlaif.refusal import is_refusal
from morlaif.stats import agreement, correlation, logistic_regression, pairwise_accuracy
from morlaif.stats import mean as mean_of

# ----------------------------------------------------------------------------- labels -> pairs


@dataclass
class Pair:
    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    p: dict[str, float] = field(default_factory=dict)  # objective -> p_a (mean over duplicate rows)
    followups: dict[str, tuple[str, str]] = field(default_factory=dict)  # objective -> (followup_a, followup_b)
    # objective -> both judge orders name the same winner (every duplicate row); None: the label has no orders
    consistent: dict[str, bool | None] = field(default_factory=dict)
    weight: dict[str, float] = field(default_factory=dict)  # objective -> weight of its label in the loss (default 1)


def load_pairs(path: Path) -> list[Pair]:
    """Group label rows (one per pair and objective) into pairs; validates p_a with file and line."""
    path = Path(path)
    rows = read_labels(path)
    lines = [i for i, ln in enumerate(path.read_text().split("\n"), 1) if ln.strip()]  # row -> file line
    pairs: dict[str, Pair] = {}
    sums: dict[tuple[str, str], list[float]] = {}
    for row, line in zip(rows, lines):
        p = row["p_a"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise InputError(f"p_a must be a number in [0, 1], got {p!r}", file=str(path), line=line, key="p_a")
        for k in ("prompt", "response_a", "response_b", "objective"):
            if not isinstance(row[k], str):
                raise InputError("must be a string", file=str(path), line=line, key=k)
        pid = str(row["pair_id"])
        pair = pairs.setdefault(pid, Pair(pid, row["prompt"], row["response_a"], row["response_b"]))
        if (pair.prompt, pair.response_a, pair.response_b) != (row["prompt"], row["response_a"], row["response_b"]):
            raise InputError(f"pair_id {pid} appears with a different prompt or responses", file=str(path), line=line,
                             key="pair_id")
        obj = row["objective"]
        sums.setdefault((pid, obj), []).append(float(p))
        c = row.get("consistent")
        if c is not None and not isinstance(c, bool):
            raise InputError(f"consistent must be true, false or null, got {c!r}", file=str(path), line=line,
                             key="consistent")
        prev = pair.consistent.get(obj, c)
        pair.consistent[obj] = None if c is None or prev is None else bool(prev and c)
        fa, fb = row.get("followup_a"), row.get("followup_b")
        if isinstance(fa, str) and isinstance(fb, str) and ":" in obj:
            pair.followups[obj] = (fa, fb)
    for (pid, obj), ps in sums.items():
        pairs[pid].p[obj] = sum(ps) / len(ps)
    return list(pairs.values())


def training_targets(pairs: list[Pair], mode: str, inconsistent_weight: float = 0.5
                     ) -> tuple[list[Pair], dict[str, float] | None]:
    """The BT targets the preference models train on (`rm.targets`), and per objective the RMS of the
    labels' log-odds ('standardized' divides by it).

    - soft: the judge's debiased p_a as it is.
    - standardized: σ(logit(p_a) / s_k), s_k the RMS of objective k's log-odds over these pairs. A judge
      whose probabilities hover at 0.5 ± 0.03 (the embedded teacher, once position bias is removed) still
      ranks the pairs; its targets then give gradients of about 1e-2 and the model barely moves. Dividing
      by s_k keeps every label's side and order (0.5 stays 0.5) and gives the objective's labels unit
      log-odds scale.
    - hard: 1 when p_a > 0.5, 0 when p_a < 0.5, 0.5 on ties.
    - sign: 1 or 0 by the debiased side (p_a > 0.5 or < 0.5; ties left out), each label weighted 1 where the
      judge's two orders name the same side and `inconsistent_weight` where they do not (0: consistent labels
      only). What a small judge knows is its sign, and the sign is right more often where both orders agree
      (embedded teacher, 72 calibration pairs: 0.79 of 43 consistent labels, 0.66 of 29 inconsistent ones).
      A label with no orders recorded (contrastive, a pairs file without `consistent`) weighs 1.
    """
    if mode == "soft":
        return pairs, None
    if mode == "sign":
        out = []
        for pr in pairs:
            weight = {o: 1.0 if pr.consistent.get(o) is not False else inconsistent_weight for o in pr.p}
            keep = [o for o, p in pr.p.items() if p != 0.5 and weight[o] > 0]
            out.append(Pair(pr.pair_id, pr.prompt, pr.response_a, pr.response_b,
                            {o: 1.0 if pr.p[o] > 0.5 else 0.0 for o in keep}, pr.followups, pr.consistent,
                            {o: weight[o] for o in keep}))
        return out, None

    def log_odds(p: float) -> float:
        q = min(max(p, 1e-6), 1 - 1e-6)  # a sure label stays finite
        return math.log(q / (1 - q))

    x = [{o: log_odds(p) for o, p in pr.p.items()} for pr in pairs]  # every label's log-odds, once
    by_objective: dict[str, list[float]] = {}
    for xi in x:
        for o, v in xi.items():
            by_objective.setdefault(o, []).append(v)
    rms = {o: math.sqrt(sum(v * v for v in vs) / len(vs)) for o, vs in by_objective.items()}

    def target(o: str, p: float, logit: float) -> float:
        if mode == "hard" or rms[o] == 0.0:
            return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
        return 1.0 / (1.0 + math.exp(-logit / rms[o]))

    out = [Pair(pr.pair_id, pr.prompt, pr.response_a, pr.response_b,
                {o: target(o, p, xi[o]) for o, p in pr.p.items()}, pr.followups, pr.consistent)
           for pr, xi in zip(pairs, x)]
    return out, rms


def longer_preferred(pair: Pair, objective: str) -> bool | None:
    """Whether the objective's label prefers the longer response (in characters); None for a tie in either."""
    la, lb, p = len(pair.response_a), len(pair.response_b), pair.p[objective]
    return None if la == lb or p == 0.5 else (p > 0.5) == (la > lb)


def refusal_preferred(pair: Pair, objective: str) -> bool | None:
    """Whether the objective's label prefers the refusing side; None unless exactly one side refuses (or a tie)."""
    ra, rb, p = is_refusal(pair.response_a), is_refusal(pair.response_b), pair.p[objective]
    return None if ra == rb or p == 0.5 else (p > 0.5) == ra


BALANCE = {"length": longer_preferred, "refusal": refusal_preferred}  # rm.balance: the two classes weighed alike


def balanced(pairs: list[Pair], side) -> list[Pair]:
    """The pairs with their labels reweighted so that, per objective, the two classes `side(pair, objective)`
    names (True / False: the label prefers the longer response, or the refusing one) weigh the same in total, the
    objective's total weight kept. A preference model trained on a few dozen pairs otherwise learns whichever
    side usually wins (the longer answer; the one that does not refuse), whatever the prompt. A label `side`
    calls None, or an objective whose labels all fall in one class, keeps its weight."""
    total: dict[tuple[str, bool], float] = {}
    for pr in pairs:
        for o in pr.p:
            c = side(pr, o)
            if c is not None:
                total[(o, c)] = total.get((o, c), 0.0) + pr.weight.get(o, 1.0)
    out = []
    for pr in pairs:
        weight = {}
        for o in pr.p:
            c, w = side(pr, o), pr.weight.get(o, 1.0)
            if c is not None and total.get((o, not c)):
                w *= (total[(o, c)] + total[(o, not c)]) / (2.0 * total[(o, c)])
            weight[o] = w
        out.append(Pair(pr.pair_id, pr.prompt, pr.response_a, pr.response_b, dict(pr.p), pr.followups,
                        pr.consistent, weight))
    return out


def class_share(pairs: list[Pair], objectives: list[str], side) -> dict[str, float | None]:
    """Per objective, the share of labels `side` calls True (None-labels left out): with `longer_preferred`, the
    held-out accuracy a preference model gets from length alone."""
    out = {}
    for o in objectives:
        c = [side(pr, o) for pr in pairs if o in pr.p]
        c = [x for x in c if x is not None]
        out[o] = sum(c) / len(c) if c else None
    return out


def split_pairs(pair_ids: list[str], eval_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Seeded held-out split by pair id (never by row: one pair's objectives stay together)."""
    ids = sorted(set(pair_ids))
    random.Random(seed).shuffle(ids)
    n_eval = round(eval_fraction * len(ids))
    if len(ids) >= 2:
        n_eval = min(max(n_eval, 1), len(ids) - 1)
    else:
        n_eval = 0
    return set(ids[n_eval:]), set(ids[:n_eval])


# ----------------------------------------------------------------------------- fitting


def train_adapter(model, adapter: str, head, tok, pairs: list[Pair], objectives: list[str], rm_cfg, device,
                  seed: int, accelerator=None, tracker=None) -> dict:
    """Train one adapter + head (K = len(objectives)) with the soft BT loss. Same code for both layouts.

    Under accelerate launch each process takes its own slice of every batch of rm.batch_size pairs
    and DDP averages the gradients; in one process nothing is wrapped. The learning rate follows
    rm.lr_scheduler_type over this adapter's steps; loss and learning rate go to `tracker`
    (`training.Tracker`) as loss/ADAPTER and lr/ADAPTER.
    """
    model.set_adapter(adapter)  # only this adapter's LoRA weights are trainable
    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{adapter}." in n]
    params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=rm_cfg.learning_rate, weight_decay=0.0)
    accelerator = accelerator or make_accelerator(device.type)
    net, opt = accelerator.prepare(preference.RewardNet(model, head), opt)
    rank = accelerator.process_index
    K = len(objectives)
    cols = torch.arange(K, device=device)
    B = rm_cfg.batch_size
    b_local = per_process(B, "rm.batch_size")
    steps = max(1, math.ceil(rm_cfg.epochs * len(pairs) / B))
    lrs = [rm_cfg.learning_rate * f for f in training.lr_factors(rm_cfg.lr_scheduler_type, rm_cfg.warmup_steps, steps)]
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    guard = NonFiniteGuard(f"rm {adapter}", rm_cfg.max_nonfinite_steps, "rm.max_nonfinite_steps",
                           any_process=across_processes(accelerator, device))
    model.train()
    head.train()
    main = accelerator.is_main_process
    bar = tqdm(range(steps), desc=f"rm {adapter}", disable=not main, leave=False)
    for step in bar:
        training.set_lr(opt, lrs[step])
        if len(order) < B:  # reshuffle every pass over the data
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        batch = process_slice([pairs[i] for i in order[:B]], rank, b_local)
        order = order[B:]
        texts, ia, ib, p, m = preference.pair_texts(tok, batch, objectives)
        r = net(*preference.encode(tok, texts, rm_cfg.max_length, device))  # (N, K)
        r_a = r[ia.to(device), cols]  # (B, K)
        r_b = r[ib.to(device), cols]  # (B, K)
        loss = preference.bt_loss(r_a, r_b, p.to(device), m.to(device))
        opt.zero_grad(set_to_none=True)
        if not guard.check(step + 1, loss=loss):  # before backward: NaN must not reach the weights
            continue
        accelerator.backward(loss)  # DDP averages the gradients over processes
        if not guard.check(step + 1, grad_norm=accelerator.clip_grad_norm_(params, 1.0)):
            continue
        opt.step()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())  # the whole batch's loss
        if main:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if tracker is not None:
                tracker.log({f"loss/{adapter}": losses[-1], f"lr/{adapter}": lrs[step]}, step + 1)
    bar.close()
    model.eval()
    head.eval()
    return {"steps": steps, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "skipped_nonfinite": guard.count}


@dataclass
class Trained:
    """The fitted adapters and heads on one backbone, and what each objective was trained on."""

    model: object  # PeftModel over the backbone, one adapter per entry of `heads`
    tok: object
    heads: dict[str, torch.nn.Linear]
    adapter_of: dict[str, str]  # objective -> adapter (and head) that scores it
    backbone: str
    device: torch.device
    max_length: int
    stats: dict[str, dict]  # adapter -> training figures
    times: dict[str, float]  # seconds: layout (the K objectives), baseline (holistic)
    checksums: list[str]  # one per process

    def groups(self, objectives: list[str]) -> dict[str, list[str]]:
        """adapter -> its objectives, in objective order."""
        out: dict[str, list[str]] = {}
        for o in objectives:
            out.setdefault(self.adapter_of[o], []).append(o)
        return out

    @torch.no_grad()
    def pair_rewards(self, adapter: str, pairs: list[Pair], objectives: list[str], batch_size: int):
        """(r_a, r_b, p_a, mask), each (P, K): both sides' rewards from `adapter` for its `objectives`,
        on the texts they were trained on."""
        K = len(objectives)
        cols = torch.arange(K)
        ra, rb, ps, ms = [], [], [], []
        self.model.set_adapter(adapter)
        self.model.eval()
        for i in range(0, len(pairs), batch_size):
            texts, ia, ib, p, m = preference.pair_texts(self.tok, pairs[i : i + batch_size], objectives)
            ids, mask = preference.encode(self.tok, texts, self.max_length, self.device)
            r = preference.rewards(self.model, self.heads[adapter], ids, mask).cpu()  # (N, K)
            ra.append(r[ia, cols])  # (B, K): objective k read from head k on its own text
            rb.append(r[ib, cols])
            ps.append(p)
            ms.append(m)
        return torch.cat(ra), torch.cat(rb), torch.cat(ps), torch.cat(ms)

    def scorer(self, objectives: list[str], layout: str) -> RewardScorer:
        """The objectives' scorer as the RL stage will load it (raw rewards: no normalisation yet)."""
        if layout == "multihead":
            return RewardScorer(self.model, self.tok, self.heads, layout, objectives, [MULTIHEAD_ADAPTER],
                                list(range(len(objectives))), None, None, self.max_length, self.device)
        return RewardScorer(self.model, self.tok, self.heads, layout, objectives,
                            [self.adapter_of[o] for o in objectives], None, None, None, self.max_length, self.device)


def fit(cfg, objectives: list[str], train_pairs: list[Pair], baseline: bool, tracker=None) -> Trained:
    """Fit the layout's adapters and heads (and the holistic baseline) on every launched process."""
    rc = cfg.rm
    backbone_name = rc.backbone or models.base_name(cfg.model.policy)
    # several processes: DDP; one: plain
    accelerator = make_accelerator(cfg.model.device, mixed_precision(cfg.model.mixed_precision, cfg.model.device))
    device = pick_device(cfg.model.device)
    dtype = models.pick_dtype(cfg.model.dtype, device)
    torch.manual_seed(cfg.seed)
    backbone = preference.load_backbone(backbone_name, device, dtype, cfg.model.trust_remote_code,
                                        cfg.model.load_in_4bit)
    training.check_lora_targets(backbone, rc.lora_target_modules, "rm.lora_target_modules")
    if rc.activation_checkpointing:
        training.enable_checkpointing(backbone)
    tok = preference.load_scoring_tokenizer(backbone_name, cfg.model.trust_remote_code)
    hidden = backbone.config.hidden_size

    # Which (adapter, objectives) to train: the layout's, then the holistic baseline.
    if rc.layout == "multihead":
        adapter_of = {o: MULTIHEAD_ADAPTER for o in objectives}
        jobs = [(MULTIHEAD_ADAPTER, objectives)]
    else:
        adapter_of = {o: f"rm_{i}" for i, o in enumerate(objectives)}  # ':' never enters module names
        jobs = [(adapter_of[o], [o]) for o in objectives]
    if baseline:
        jobs.append((BASELINE_ADAPTER, [HOLISTIC]))

    model = None
    heads: dict[str, torch.nn.Linear] = {}
    stats: dict[str, dict] = {}
    times = {"layout": 0.0, "baseline": 0.0}
    for j, (adapter, objs) in enumerate(jobs):
        model = preference.add_adapter(backbone, model, adapter, rc.lora_r, rc.lora_target_modules)
        heads[adapter] = preference.make_head(hidden, len(objs), cfg.seed + j).to(device)
        t0 = time.perf_counter()
        use = [p for p in train_pairs if any(o in p.p for o in objs)]
        stats[adapter] = train_adapter(model, adapter, heads[adapter], tok, use, objs, rc, device, cfg.seed + j,
                                       accelerator, tracker)
        times["baseline" if adapter == BASELINE_ADAPTER else "layout"] += time.perf_counter() - t0
        if accelerator.is_main_process:
            print(f"[rm] {adapter} ({', '.join(objs)}): {stats[adapter]}", flush=True)

    # One checksum of every trained weight per process: all equal unless DDP failed to keep them in sync.
    trained = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    trained += [(f"{a}.{n}", p) for a, h in heads.items() for n, p in h.named_parameters()]
    return Trained(model, tok, heads, adapter_of, backbone_name, device, rc.max_length, stats, times,
                   gathered_checksums(trained))


# ----------------------------------------------------------------------------- measuring


def held_out_accuracy(trained: Trained, eval_pairs: list[Pair], objectives: list[str], baseline: bool,
                      batch_size: int) -> tuple[dict[str, float | None], float | None, dict[str, int]]:
    """Accuracy per objective (and of the holistic baseline) on held-out pairs, on their training texts.

    Returns (accuracy by objective, baseline accuracy, decisive held-out pairs by objective)."""
    accuracy: dict[str, float | None] = {}
    n_eval: dict[str, int] = {}
    groups = trained.groups(objectives)
    if baseline:
        groups[BASELINE_ADAPTER] = [HOLISTIC]
    for adapter, objs in groups.items():
        ra, rb, p, m = trained.pair_rewards(adapter, eval_pairs, objs, batch_size)
        for k, o in enumerate(objs):
            keep = m[:, k] > 0
            accuracy[o], n_eval[o] = pairwise_accuracy(ra[keep, k], rb[keep, k], p[keep, k])
    single = accuracy.pop(HOLISTIC, None)
    return accuracy, single, n_eval


def consistent_labels(pairs: list[Pair]) -> list[Pair]:
    """The pairs with only the labels both judge orders agree on (objectives whose orders disagree dropped)."""
    return [Pair(p.pair_id, p.prompt, p.response_a, p.response_b,
                 {o: v for o, v in p.p.items() if p.consistent.get(o) is True}, p.followups, p.consistent)
            for p in pairs]


def calibration_agreement(scorer: RewardScorer, rows: list[dict]) -> dict[str, dict]:
    """Per objective of the scorer, how often its preference model agrees with the hand-labelled pairs of
    that objective (`promptsets.load_calibration` rows), with the Wilson interval; objectives without rows are
    absent (aspect objectives never have any: a labelled pair has no follow-up answer)."""
    out = {}
    for k, o in enumerate(scorer.objectives):
        mine = [r for r in rows if r.get("objective") == o]
        if not mine or preference.aspect(o) is not None:
            continue
        prompts = [r["prompt"] for r in mine]
        none = {a: [None] * len(mine) for a in scorer.aspects}  # no follow-up answers: NaN in aspect columns
        r_a = scorer.score(prompts, [r["response_a"] for r in mine], none).double().cpu()[:, k]  # (N,)
        r_b = scorer.score(prompts, [r["response_b"] for r in mine], none).double().cpu()[:, k]  # (N,)
        out[o] = agreement(r_a, r_b, torch.tensor([1.0 if r["preferred"] == "a" else 0.0 for r in mine]))
    return out


def regression_weights(trained: Trained, pairs: list[Pair], objectives: list[str], std: torch.Tensor,
                       batch_size: int) -> dict[str, float]:
    """How the holistic label weighs the objectives: logistic regression of the soft holistic label on
    z-scored per-objective reward differences (no intercept, L2 1e-2), over every pair that has it."""
    both = [p for p in pairs if HOLISTIC in p.p]
    X = []
    for adapter, objs in trained.groups(objectives).items():
        ra, rb, _, _ = trained.pair_rewards(adapter, both, objs, batch_size)
        X.append(ra - rb)  # (P, k)
    Xd = torch.cat(X, 1) / std.clamp(min=1e-3)  # (P, K) differences in z units, as the scalarizers see them
    y = torch.tensor([p.p[HOLISTIC] for p in both])
    w = logistic_regression(Xd, y)
    return {o: float(w[k]) for k, o in enumerate(objectives)}


def response_followups(pairs: list[Pair], eval_ids: set[str]) -> dict[tuple[str, str, bool], dict[str, str]]:
    """Every response of the labelled pairs once, keyed (prompt, response, held out), with the
    follow-up answers its labels recorded, by aspect."""
    out: dict[tuple[str, str, bool], dict[str, str]] = {}
    for p in pairs:
        for side, r in enumerate((p.response_a, p.response_b)):
            fu = out.setdefault((p.prompt, r, p.pair_id in eval_ids), {})
            for obj, answers in p.followups.items():
                fu.setdefault(preference.aspect(obj), answers[side])
    return out


def column_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (population) std of scores (N, K) over the finite entries (an aspect
    objective has no score for a response whose labels carry no follow-up answer)."""
    if torch.isfinite(scores).all():
        return scores.mean(0), scores.std(0, unbiased=False)
    cols = [c[torch.isfinite(c)] for c in scores.T]
    return torch.stack([c.mean() for c in cols]), torch.stack([c.std(unbiased=False) for c in cols])


def save(out: Path, trained: Trained, layout: str, objectives: list[str], baseline: bool, mean, std,
         n_responses: int, holistic_norm: tuple[float, float] | None = None) -> None:
    """Adapters (safetensors through PEFT), heads (safetensors), objectives.json, norm.json (and in it the
    holistic baseline's mean and std when it is trained)."""
    models.save_adapter(trained.model, trained.tok, out / "model", base=trained.backbone)
    save_file({f"{a}.{n}": t.detach().float().cpu().contiguous() for a, h in trained.heads.items()
               for n, t in h.state_dict().items()}, str(out / "heads.safetensors"))
    write_json(out / "objectives.json", {
        "layout": layout, "objectives": objectives, "adapters": trained.adapter_of, "backbone": trained.backbone,
        "baseline_adapter": BASELINE_ADAPTER if baseline else None, "max_length": trained.max_length,
    })
    write_json(out / "norm.json", {
        "objectives": objectives, "mean": {o: float(mean[k]) for k, o in enumerate(objectives)},
        "std": {o: float(std[k]) for k, o in enumerate(objectives)}, "n_responses": n_responses,
        HOLISTIC: None if holistic_norm is None else {"mean": holistic_norm[0], "std": holistic_norm[1]},
    })


# ----------------------------------------------------------------------------- stage


def train(cfg, labels_path: Path, out: Path) -> dict:
    """Body of the rm stage: fit, held-out accuracy, normalisation statistics, regression, save.
    Returns the manifest summary (metrics.json holds everything)."""
    rc = cfg.rm
    objectives = [o.name for o in configured_objectives(cfg.constitution)]
    pairs = load_pairs(labels_path)
    if not pairs:
        raise InputError("no labelled pairs", file=str(labels_path))
    labelled = {o for pr in pairs for o in pr.p}
    missing = [o for o in objectives if o not in labelled]
    if missing:
        raise InputError(f"the labels have no rows for objective(s) {missing} (labelled: {sorted(labelled)})",
                         file=str(labels_path), key="constitution.objectives")
    train_ids, eval_ids = split_pairs([p.pair_id for p in pairs], rc.eval_fraction, cfg.seed)
    train_pairs = [p for p in pairs if p.pair_id in train_ids]
    eval_pairs = [p for p in pairs if p.pair_id in eval_ids]
    has_holistic = HOLISTIC in labelled
    baseline = rc.baseline and has_holistic

    fit_pairs, label_rms = training_targets(train_pairs, rc.targets, rc.inconsistent_weight)
    if rc.balance != "none":
        fit_pairs = balanced(fit_pairs, BALANCE[rc.balance])
    empty = [o for o in objectives + ([HOLISTIC] if baseline else []) if not any(o in p.p for p in fit_pairs)]
    if empty:
        raise InputError(f"no training label for {empty} under rm.targets '{rc.targets}' (of {len(train_pairs)} "
                         "training pairs; 'sign' with rm.inconsistent_weight 0 keeps only the labels both judge orders agree on): label more pairs "
                         "or choose other targets", file=str(labels_path), key="rm.targets")
    tracker = training.Tracker(cfg, out.parent, "rm")
    try:
        trained = fit(cfg, objectives, fit_pairs, baseline, tracker)
    finally:
        tracker.close()
    if not is_main_process():
        return {}  # evaluation, normalisation statistics and every file: the main process alone

    accuracy, single_acc, n_eval = held_out_accuracy(trained, eval_pairs, objectives, baseline, rc.batch_size)
    # The yardstick that means something: held-out labels whose sign the judge gives in both orders.
    acc_consistent, single_consistent, n_consistent = held_out_accuracy(
        trained, consistent_labels(eval_pairs), objectives, baseline, rc.batch_size)
    # Normalisation statistics: the raw rewards of every response of the labelled pairs (the SFT
    # policy's samples, with their follow-up answers), scored as the RL stage will score them.
    scorer = trained.scorer(objectives, rc.layout)
    responses = response_followups(pairs, eval_ids)  # {(prompt, response, held out): {aspect: answer}}
    prompts, texts = [t[0] for t in responses], [t[1] for t in responses]
    followups = {a: [fu.get(a) for fu in responses.values()] for a in scorer.aspects}
    bs = max(rc.batch_size * 2, 16)
    scores = scorer.score(prompts, texts, followups, batch_size=bs).float().cpu()  # (N, K), NaN: no follow-up
    mean, std = column_stats(scores)  # (K,), (K,)
    holistic_norm = None
    if baseline:  # the holistic baseline's statistics on the same responses: an rl stage on it z-scores alike
        holistic = RewardScorer(trained.model, trained.tok, trained.heads, "separate", [HOLISTIC], [BASELINE_ADAPTER],
                                None, None, None, trained.max_length, trained.device)
        h_mean, h_std = column_stats(holistic.score(prompts, texts, batch_size=bs).float().cpu())  # (1,), (1,)
        holistic_norm = (float(h_mean[0]), float(h_std[0]))
    held = torch.tensor([t[2] for t in responses]) & torch.isfinite(scores).all(1)
    corr = correlation(scores[held]) if int(held.sum()) >= 2 else None
    reg = regression_weights(trained, pairs, objectives, std, rc.batch_size) if has_holistic else None
    calibration = calibration_agreement(scorer, load_calibration())
    save(out, trained, rc.layout, objectives, baseline, mean, std, len(responses), holistic_norm)

    metrics = {
        "objectives": objectives,
        "layout": rc.layout,
        "backbone": trained.backbone,
        "accuracy": accuracy,
        "accuracy_consistent": acc_consistent,
        "mean_accuracy_consistent": mean_of([v for v in acc_consistent.values() if v is not None]),
        "n_eval_consistent": n_consistent,
        # what length alone scores on the same held-out labels: a preference model must beat it
        "longer_wins": class_share(eval_pairs, objectives, longer_preferred),
        "longer_wins_consistent": class_share(consistent_labels(eval_pairs), objectives, longer_preferred),
        # of the held-out labels where exactly one side refuses, the share that prefer the refusal
        "refusal_wins": class_share(eval_pairs, objectives, refusal_preferred),
        "balance": rc.balance,
        "single_objective_accuracy": single_acc,
        "single_objective_accuracy_consistent": single_consistent,
        "calibration_agreement": calibration,
        "correlation": corr,
        "regression_weights": reg,
        "n_pairs": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "targets": rc.targets,
        "label_log_odds_rms": None if label_rms is None else {o: round(v, 5) for o, v in label_rms.items()},
        "n_eval_decisive": n_eval,
        "train_time_s": round(trained.times["layout"], 3),
        "baseline_train_time_s": round(trained.times["baseline"], 3) if baseline else None,
        "training": trained.stats,
        "processes": len(trained.checksums),
        "param_checksums": trained.checksums,
        "notes": [
            "accuracy: held-out pairs, against the label's majority side; p_a = 0.5 ties excluded, equal rewards count 0.5",
            "longer_wins: share of the held-out labels preferring the longer response (what length alone scores); "
            "refusal_wins: of the held-out labels where exactly one side refuses, the share preferring the refusal; "
            "balance: the two classes (longer/shorter or refusal/answer preferred) weighed alike in training (rm.balance)",
            "accuracy_consistent: the same on the held-out labels whose two judge orders name the same winner "
            "(n_eval_consistent per objective); calibration_agreement: per objective, agreement with the packaged "
            "hand-labelled calibration pairs of that objective, 95% Wilson interval",
            "targets: what the BT loss trained on (rm.targets); label_log_odds_rms: per objective, the RMS of the "
            "training labels' log-odds (standardized targets divide by it)",
            "separate layout: own soft-label BT loop (TRL's RewardTrainer needs hard pairs), one LoRA adapter + head "
            "per objective on one shared frozen backbone",
            "regression_weights: logistic regression (no intercept, L2 1e-2) of the soft holistic label on z-scored "
            "per-objective reward differences over all labelled pairs",
        ],
    }
    if not has_holistic:
        metrics["notes"].append("no 'holistic' labels: single-objective baseline and regression weights skipped")
    elif not rc.baseline:
        metrics["notes"].append("rm.baseline is off: single-objective baseline skipped")
    write_json(out / "metrics.json", metrics)
    return {k: metrics[k] for k in ("accuracy", "accuracy_consistent", "single_objective_accuracy", "train_time_s")}


def run(cfg, run_dir: Path) -> Path:
    """Stage `rm`: RUN/feedback/labels.jsonl -> RUN/rm/."""
    run_dir = Path(run_dir)
    labels = run_dir / "feedback" / "labels.jsonl"
    if not labels.is_file():
        raise InputError("labels not found: run `morlaif feedback --run DIR` first", file=str(labels))
    return run_stage("rm", run_dir / "rm", config=cfg.sections("model", "constitution", "rm"), inputs=[labels],
                     body=lambda out: train(cfg, labels, out))
