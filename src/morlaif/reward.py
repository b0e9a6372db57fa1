"""Stage `rm`: one preference (reward) model per objective, trained on soft AI labels (DESIGN.md §4).

Loss: Bradley-Terry with soft labels, L = -[p log σ(r_a - r_b) + (1 - p) log σ(r_b - r_a)].

Layouts (cfg.rm.layout):
- `multihead`: one backbone with one LoRA adapter and a Linear(hidden, K) head on the hidden state
  of the last real token; all K objectives are trained jointly and scored in one forward pass.
- `separate`: one LoRA adapter + Linear(hidden, 1) head per objective (the MORLAIF paper's layout),
  trained one after the other; scoring costs K forward passes. All adapters sit on one frozen copy
  of the backbone (PEFT multi-adapter), so memory stays one model, not K.
  Why not TRL's RewardTrainer here: it takes hard chosen/rejected pairs and would throw away the
  soft labels (and every p_a = 0.5 tie). Our own loop keeps the soft loss, and `separate` is the
  very same code path as `multihead` with K = 1, so the two layouts differ only in the layout.
- Single-objective baseline: the same K = 1 path on the "holistic" label (when the labels have it).

Artifacts (RUN/rm/): model/ (PEFT adapters, safetensors, one sub-dir per adapter + tokenizer),
heads.safetensors, objectives.json (layout, objectives, adapters, backbone), norm.json (per-objective
mean/std of the raw reward over the SFT policy's responses in the labelled pairs), metrics.json.

`RewardScorer.load(run_dir, cfg)` is what PPO, GRPO, evaluation and best-of-N use.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from morlaif.artifacts import confine, per_process, read_json, read_jsonl, run_stage, write_json
from morlaif.errors import InputError
from morlaif.nonfinite import NonFiniteGuard, across_processes

HOLISTIC = "holistic"
MULTIHEAD_ADAPTER = "multihead"
BASELINE_ADAPTER = "holistic"
LABEL_FIELDS = ("pair_id", "prompt", "response_a", "response_b", "objective", "p_a")


# ----------------------------------------------------------------------------- pure functions


def bt_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-label Bradley-Terry loss, mean over the (masked) entries.

    r_a, r_b, p_a, mask: same shape, e.g. (B, K). p_a = P(a preferred). mask = 1 where a label exists.
    logsigmoid keeps it finite for large reward gaps.
    """
    d = r_a - r_b  # (B, K) reward margins
    loss = -(p_a * F.logsigmoid(d) + (1 - p_a) * F.logsigmoid(-d))  # (B, K)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def pairwise_accuracy(r_a, r_b, p_a) -> tuple[float | None, int]:
    """Share of pairs where the reward model picks the label's majority side; label ties (p_a = 0.5) excluded.

    Equal rewards count half (the model did not choose). Returns (accuracy or None when no pair counts, n).
    """
    r_a, r_b, p_a = (torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in (r_a, r_b, p_a))
    keep = (p_a != 0.5) & ~torch.isnan(p_a)
    n = int(keep.sum())
    if n == 0:
        return None, 0
    want = torch.sign(p_a[keep] - 0.5)  # (n,) +1: a preferred
    got = torch.sign(r_a[keep] - r_b[keep])  # (n,)
    hits = (got == want).double() + 0.5 * (got == 0).double()
    return float(hits.mean()), n


def correlation(scores: torch.Tensor) -> list[list[float | None]]:
    """K×K Pearson correlation of the columns of scores (N, K); None where a column has no variance."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    c = s - s.mean(0, keepdim=True)  # (N, K)
    sd = c.pow(2).sum(0).sqrt()  # (K,)
    cov = c.T @ c  # (K, K)
    K = s.shape[1]
    out: list[list[float | None]] = []
    for i in range(K):
        row: list[float | None] = []
        for j in range(K):
            ok = sd[i] > 1e-12 and sd[j] > 1e-12
            row.append(float(cov[i, j] / (sd[i] * sd[j])) if ok else None)
        out.append(row)
    return out


def logistic_regression(X, y, l2: float = 1e-2, iters: int = 50) -> torch.Tensor:
    """Weights w (K,) minimising mean BCE(σ(X w), y) + l2/2 |w|², by Newton's method.

    X (N, K) per-objective score differences a - b; y (N,) soft targets in [0, 1]. No intercept:
    swapping a and b must flip the prediction. The L2 term keeps w finite on separable data.
    """
    X = torch.as_tensor(X, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    N, K = X.shape
    w = torch.zeros(K, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for _ in range(iters):
        s = torch.sigmoid(X @ w)  # (N,)
        grad = X.T @ (s - y) / N + l2 * w  # (K,)
        hess = (X.T * (s * (1 - s))) @ X / N + l2 * eye  # (K, K)
        step = torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]  # lstsq: safe when l2 = 0 and H is singular
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return w


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


# ----------------------------------------------------------------------------- labels -> pairs


def objective_names(cfg) -> list[str]:
    from morlaif.constitution import load_constitution

    return [o.name for o in load_constitution(cfg.constitution.name).objectives(cfg.constitution.objectives)]


@dataclass
class Pair:
    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    p: dict[str, float] = field(default_factory=dict)  # objective -> p_a (mean over duplicate rows)
    followups: dict[str, tuple[str, str]] = field(default_factory=dict)  # objective -> (followup_a, followup_b)


def load_pairs(path: Path) -> list[Pair]:
    """Group label rows (one per pair and objective) into pairs; validates p_a with file and line."""
    path = Path(path)
    rows = read_jsonl(path, required=LABEL_FIELDS)
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
        fa, fb = row.get("followup_a"), row.get("followup_b")
        if isinstance(fa, str) and isinstance(fb, str) and ":" in obj:
            pair.followups[obj] = (fa, fb)
    for (pid, obj), ps in sums.items():
        pairs[pid].p[obj] = sum(ps) / len(ps)
    return list(pairs.values())


# ----------------------------------------------------------------------------- model pieces


def _load_backbone(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """The transformer body without its LM head (no wasted vocab projection): AutoModel, or the
    body of a merged adapter directory."""
    from transformers import AutoModel

    from morlaif import models

    path = models.resolve(name)
    if models.is_adapter(path):
        lm = models.load_model(name, device=str(device.type), dtype=str(dtype).removeprefix("torch."),
                               trust_remote_code=trust_remote_code)
        body = lm.merge_and_unload().base_model
    else:  # models.resolve has already refused names that are neither a local path nor a hub id
        body = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    body.config.use_cache = False
    return body.to(device)


def _load_tokenizer(name: str, trust_remote_code: bool):
    from morlaif import models

    tok = models.load_tokenizer(name, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # natural position ids; the last real token is found from the mask
    tok.truncation_side = "left"  # keep the end of the response, where the reward is read
    return tok


def _lora_config(r: int, model_type: str):
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    # PEFT's per-architecture default targets (q/v projections for Llama, query/value for BERT);
    # every linear layer for an architecture it has no default for.
    targets = None if model_type in DEFAULT_TARGETS else "all-linear"
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, bias="none")


def _add_adapter(backbone, model, name: str, r: int):
    """Attach one more LoRA adapter; the first call wraps the backbone into a PeftModel."""
    from peft import get_peft_model

    cfg = _lora_config(r, getattr(backbone.config, "model_type", ""))
    if model is None:
        return get_peft_model(backbone, cfg, adapter_name=name)
    model.add_adapter(name, cfg)
    return model


def _make_head(hidden: int, k: int, seed: int) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, k, bias=False)  # no bias: BT sees only reward differences, a bias never learns
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden), generator=g)
    return head


def render_pair_text(tok, prompt: str, response: str, followup: tuple[str, str] | None = None) -> str:
    """(prompt, response[, follow-up question, follow-up answer]) as one chat transcript."""
    from morlaif.generation import render

    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if followup is not None:
        msgs += [{"role": "user", "content": followup[0]}, {"role": "assistant", "content": followup[1]}]
    return render(tok, msgs, add_generation_prompt=False)


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (N, H) of the last real token of each row of hidden (N, T, H).

    Found from the attention mask, never from `!= pad` (SmolLM2 pads with its EOS, which is also a
    real token at the end of every turn). Works for left or right padding.
    """
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)[None]  # (1, T)
    last = (attention_mask.long() * (pos + 1)).argmax(1)  # (N,) index of the last 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)


def _encode(tok, texts: list[str], max_length: int, device):
    special = not getattr(tok, "chat_template", None)  # a chat template already writes BOS/EOS-like tokens
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
              add_special_tokens=special)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _rewards(model, head, input_ids, attention_mask) -> torch.Tensor:
    """(N, K_head) rewards from the active adapter and its head."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = last_token_hidden(out.last_hidden_state, attention_mask)  # (N, H)
    return head(h.float())  # (N, K) heads run in fp32 whatever the backbone dtype


# ----------------------------------------------------------------------------- training


def _pair_batch_texts(tok, pairs: list[Pair], objectives: list[str]):
    """Texts to forward for a batch of pairs and, per (pair, objective), the rows of side a and b.

    Action objectives (and aspects without follow-up answers) score (prompt, response); aspects with
    follow-ups score the transcript with the follow-up turn. Identical texts are forwarded once, so
    with action objectives a batch of B pairs costs 2B sequences whatever K is.
    """
    from morlaif.constitution import aspect_questions

    questions = None
    texts: dict[str, int] = {}
    idx_a, idx_b, p, mask = [], [], [], []
    for pair in pairs:
        ra, rb, pp, mm = [], [], [], []
        for obj in objectives:
            fu = pair.followups.get(obj)
            if fu is not None:
                questions = questions or aspect_questions()
                q = questions.get(obj.partition(":")[2], "")
                ta = render_pair_text(tok, pair.prompt, pair.response_a, (q, fu[0]))
                tb = render_pair_text(tok, pair.prompt, pair.response_b, (q, fu[1]))
            else:
                ta = render_pair_text(tok, pair.prompt, pair.response_a)
                tb = render_pair_text(tok, pair.prompt, pair.response_b)
            ra.append(texts.setdefault(ta, len(texts)))
            rb.append(texts.setdefault(tb, len(texts)))
            has = obj in pair.p
            pp.append(pair.p.get(obj, 0.5))
            mm.append(1.0 if has else 0.0)
        idx_a.append(ra)
        idx_b.append(rb)
        p.append(pp)
        mask.append(mm)
    return (list(texts), torch.tensor(idx_a), torch.tensor(idx_b), torch.tensor(p), torch.tensor(mask))


def _pair_rewards(model, head, tok, pairs, objectives, max_length, device, batch_size):
    """(r_a, r_b, p_a, mask), each (P, K): rewards of both sides for each objective."""
    K = len(objectives)
    cols = torch.arange(K)
    ra, rb, ps, ms = [], [], [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            texts, ia, ib, p, m = _pair_batch_texts(tok, pairs[i : i + batch_size], objectives)
            r = _rewards(model, head, *_encode(tok, texts, max_length, device)).cpu()  # (N, K)
            ra.append(r[ia, cols])  # (B, K): objective k read from head k on its own text
            rb.append(r[ib, cols])
            ps.append(p)
            ms.append(m)
    return torch.cat(ra), torch.cat(rb), torch.cat(ps), torch.cat(ms)


class RewardNet(torch.nn.Module):
    """Backbone (active adapter) + head as one module: what `accelerator.prepare` wraps in DDP."""

    def __init__(self, model, head: torch.nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids, attention_mask):
        return _rewards(self.model, self.head, input_ids, attention_mask)


def train_adapter(model, adapter: str, head, tok, pairs: list[Pair], objectives: list[str], rm_cfg, device,
                  seed: int, accelerator=None) -> dict:
    """Train one adapter + head (K = len(objectives)) with the soft BT loss. Same code for both layouts.

    Under accelerate launch each process takes its own slice of every batch of rm.batch_size pairs
    and DDP averages the gradients; in one process nothing is wrapped.
    """
    from morlaif import models

    model.set_adapter(adapter)  # only this adapter's LoRA weights are trainable
    params = [p for n, p in model.named_parameters() if p.requires_grad and f".{adapter}." in n]
    params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=rm_cfg.learning_rate, weight_decay=0.0)
    accelerator = accelerator or models.make_accelerator(device.type)
    net, opt = accelerator.prepare(RewardNet(model, head), opt)
    rank = accelerator.process_index
    K = len(objectives)
    cols = torch.arange(K, device=device)
    B = rm_cfg.batch_size
    b_local = per_process(B, "rm.batch_size")
    steps = max(1, math.ceil(rm_cfg.epochs * len(pairs) / B))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    guard = NonFiniteGuard(f"rm {adapter}", rm_cfg.max_nonfinite_steps, "rm.max_nonfinite_steps",
                           any_process=across_processes(accelerator, device))
    model.train()
    head.train()
    for step in range(steps):
        if len(order) < B:  # reshuffle every pass over the data
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        batch = [pairs[i] for i in order[:B]][rank * b_local : (rank + 1) * b_local]  # this process's slice
        order = order[B:]
        texts, ia, ib, p, m = _pair_batch_texts(tok, batch, objectives)
        r = net(*_encode(tok, texts, rm_cfg.max_length, device))  # (N, K)
        r_a = r[ia.to(device), cols]  # (B, K)
        r_b = r[ib.to(device), cols]  # (B, K)
        loss = bt_loss(r_a, r_b, p.to(device), m.to(device))
        opt.zero_grad(set_to_none=True)
        if not guard.check(step + 1, loss=loss):  # before backward: NaN must not reach the weights
            continue
        accelerator.backward(loss)  # DDP averages the gradients over processes
        if not guard.check(step + 1, grad_norm=accelerator.clip_grad_norm_(params, 1.0)):
            continue
        opt.step()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())  # the whole batch's loss
    model.eval()
    head.eval()
    return {"steps": steps, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "skipped_nonfinite": guard.count}


# ----------------------------------------------------------------------------- scorer


def check_trained_objectives(run_dir: str | Path, cfg) -> list[str]:
    """The objectives cfg asks for, after checking that RUN/rm's preference models were trained for them."""
    meta_path = Path(run_dir) / "rm" / "objectives.json"
    trained = read_json(meta_path)["objectives"]
    wanted = objective_names(cfg)
    missing = [o for o in wanted if o not in trained]
    if missing:
        raise InputError(f"the config asks for objective(s) {missing} but the preference models in {meta_path.parent} "
                         f"were trained for {trained}; re-run `morlaif rm`", file=str(meta_path),
                         key="constitution.objectives")
    return wanted


class RewardScorer:
    """Per-objective rewards of (prompt, response) pairs from the trained preference models.

    score() returns raw rewards (B, K) on `self.device`, in `self.objectives` order; multihead is one
    forward pass per batch, separate is K. normalize() z-scores with RUN/rm/norm.json.
    """

    def __init__(self, model, tok, heads: dict[str, torch.nn.Linear], layout: str, objectives: list[str],
                 adapters: list[str], columns: list[int] | None, mean, std, max_length: int, device):
        self.model, self.tok, self.heads = model, tok, heads
        self.layout, self.objectives, self.adapters, self.columns = layout, list(objectives), adapters, columns
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.max_length = max_length
        self.device = torch.device(device)

    @classmethod
    def load(cls, run_dir: str | Path, cfg, baseline: bool = False) -> RewardScorer:
        """Load RUN/rm for the objectives cfg asks for (a subset of the trained ones is fine).

        baseline=True loads the single-objective holistic model instead (objectives == ["holistic"]).
        """
        from safetensors.torch import load_file

        from morlaif import models

        rm = Path(run_dir) / "rm"
        meta_path = rm / "objectives.json"
        if not meta_path.is_file():
            raise InputError("no preference models here: run `morlaif rm --run DIR` first", file=str(meta_path))
        meta = read_json(meta_path)
        trained = meta["objectives"]
        if baseline:
            if not meta.get("baseline_adapter"):
                raise InputError("this run has no single-objective baseline (no holistic labels, or rm.baseline off)",
                                 file=str(meta_path), key="rm.baseline")
            wanted, layout, adapters, columns = [HOLISTIC], "separate", [meta["baseline_adapter"]], None
        else:
            wanted = check_trained_objectives(run_dir, cfg)
            layout = meta["layout"]
            if layout == "multihead":
                adapters, columns = [MULTIHEAD_ADAPTER], [trained.index(o) for o in wanted]
            else:
                adapters, columns = [meta["adapters"][o] for o in wanted], None
        device = models.pick_device(cfg.model.device)
        dtype = models.pick_dtype(cfg.model.dtype, device)
        backbone = _load_backbone(meta["backbone"], device, dtype, cfg.model.trust_remote_code)
        from peft import PeftModel

        model = None
        for a in adapters:
            # adapter names come from a file: confined to rm/model/, weights from safetensors only
            path = str(models.require_safetensors_adapter(confine(rm / "model", a)))
            if model is None:
                model = PeftModel.from_pretrained(backbone, path, adapter_name=a)
            else:
                model.load_adapter(path, adapter_name=a)
        model.eval()
        tensors = load_file(str(rm / "heads.safetensors"))
        heads = {}
        for a in adapters:
            w = tensors[f"{a}.weight"]  # (K, H)
            head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            head.load_state_dict({"weight": w})
            heads[a] = head.to(device).eval()
        tok = _load_tokenizer(str(rm / "model"), cfg.model.trust_remote_code)
        mean = std = None
        norm_path = rm / "norm.json"
        if norm_path.is_file() and not baseline:
            norm = read_json(norm_path)
            mean = [norm["mean"][o] for o in wanted]
            std = [norm["std"][o] for o in wanted]
        return cls(model, tok, heads, layout, wanted, adapters, columns, mean, std, meta["max_length"], device)

    def texts(self, prompts: list[str], responses: list[str]) -> list[str]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [render_pair_text(self.tok, p, r) for p, r in zip(prompts, responses)]

    @torch.no_grad()  # not inference_mode: callers may modify the result in place inside autograd code
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """Raw rewards (B, K) of each (prompt, response), on self.device."""
        texts = self.texts(prompts, responses)
        self.model.eval()
        out = torch.empty(len(texts), len(self.objectives), device=self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = _encode(self.tok, [texts[i] for i in idx], self.max_length, self.device)
            if self.layout == "multihead":
                self.model.set_adapter(MULTIHEAD_ADAPTER)
                r = _rewards(self.model, self.heads[MULTIHEAD_ADAPTER], ids, mask)[:, self.columns]  # (b, K)
            else:
                cols = []
                for a in self.adapters:  # one forward pass per objective: the cost of this layout
                    self.model.set_adapter(a)
                    cols.append(_rewards(self.model, self.heads[a], ids, mask))  # (b, 1)
                r = torch.cat(cols, 1)  # (b, K)
            out[torch.tensor(idx, device=self.device)] = r
        return out

    def normalize(self, r: torch.Tensor) -> torch.Tensor:
        """(B, K) z-scored with the per-objective mean/std of the SFT policy's responses."""
        from morlaif.scalarize import normalize

        if self.mean is None:
            raise InputError("no normalisation statistics (rm/norm.json) for these rewards", key="rl.normalize")
        return normalize(r, self.mean.to(r.device), self.std.to(r.device))


# ----------------------------------------------------------------------------- stage


def train(cfg, labels_path: Path, out: Path) -> dict:
    """Body of the rm stage: train, evaluate, normalise, save. Returns the metrics dict."""
    from safetensors.torch import save_file

    from morlaif import models

    rc = cfg.rm
    objectives = objective_names(cfg)
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

    backbone_name = rc.backbone or models.base_name(cfg.model.policy)
    accelerator = models.make_accelerator(cfg.model.device)  # several processes: DDP; one: plain
    device = models.pick_device(cfg.model.device)
    dtype = models.pick_dtype(cfg.model.dtype, device)
    torch.manual_seed(cfg.seed)
    backbone = _load_backbone(backbone_name, device, dtype, cfg.model.trust_remote_code)
    tok = _load_tokenizer(backbone_name, cfg.model.trust_remote_code)
    hidden = backbone.config.hidden_size

    # Which (adapter, head, objectives) to train: the layout's, then the holistic baseline.
    jobs: list[tuple[str, list[str]]] = []
    if rc.layout == "multihead":
        jobs.append((MULTIHEAD_ADAPTER, objectives))
        adapter_of = {o: MULTIHEAD_ADAPTER for o in objectives}
    else:
        adapter_of = {o: f"rm_{i}" for i, o in enumerate(objectives)}  # ':' never enters module names
        jobs += [(adapter_of[o], [o]) for o in objectives]
    has_holistic = HOLISTIC in labelled
    do_baseline = rc.baseline and has_holistic
    if do_baseline:
        jobs.append((BASELINE_ADAPTER, [HOLISTIC]))

    model = None
    heads: dict[str, torch.nn.Linear] = {}
    train_stats: dict[str, dict] = {}
    times = {"layout": 0.0, "baseline": 0.0}
    for j, (adapter, objs) in enumerate(jobs):
        model = _add_adapter(backbone, model, adapter, rc.lora_r)
        heads[adapter] = _make_head(hidden, len(objs), cfg.seed + j).to(device)
        t0 = time.perf_counter()
        use = [p for p in train_pairs if any(o in p.p for o in objs)]
        train_stats[adapter] = train_adapter(model, adapter, heads[adapter], tok, use, objs, rc, device, cfg.seed + j,
                                             accelerator)
        times["baseline" if adapter == BASELINE_ADAPTER else "layout"] += time.perf_counter() - t0
        if accelerator.is_main_process:
            print(f"[rm] {adapter} ({', '.join(objs)}): {train_stats[adapter]}", flush=True)

    # One checksum of every trained weight per process: all equal unless DDP failed to keep them in sync.
    from accelerate.utils import gather_object

    trained = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    trained += [(f"{a}.{n}", p) for a, h in heads.items() for n, p in h.named_parameters()]
    checksums = gather_object([models.param_checksum(trained)])
    if not accelerator.is_main_process:
        return {}  # evaluation, normalisation statistics and every file: the main process alone

    # Held-out accuracy per objective, on the same texts the models were trained on.
    accuracy: dict[str, float | None] = {}
    n_eval: dict[str, int] = {}
    for adapter in dict.fromkeys(adapter_of[o] for o in objectives):
        objs = [o for o in objectives if adapter_of[o] == adapter]
        ra, rb, p, m = _pair_rewards(model, heads[adapter], tok, eval_pairs, objs, rc.max_length, device, rc.batch_size)
        for k, o in enumerate(objs):
            keep = m[:, k] > 0
            accuracy[o], n_eval[o] = pairwise_accuracy(ra[keep, k], rb[keep, k], p[keep, k])
    single_acc = None
    if do_baseline:
        ra, rb, p, m = _pair_rewards(model, heads[BASELINE_ADAPTER], tok, eval_pairs, [HOLISTIC], rc.max_length,
                                     device, rc.batch_size)
        keep = m[:, 0] > 0
        single_acc, n_eval[HOLISTIC] = pairwise_accuracy(ra[keep, 0], rb[keep, 0], p[keep, 0])

    # Scoring as the RL stage will: (prompt, response) only, through the RewardScorer.
    columns = list(range(len(objectives))) if rc.layout == "multihead" else None
    score_adapters = [MULTIHEAD_ADAPTER] if rc.layout == "multihead" else [adapter_of[o] for o in objectives]
    scorer = RewardScorer(model, tok, heads, rc.layout, objectives, score_adapters, columns, None, None,
                          rc.max_length, device)
    responses = list(dict.fromkeys((p.prompt, r, p.pair_id in eval_ids) for p in pairs
                                   for r in (p.response_a, p.response_b)))
    bs = max(rc.batch_size * 2, 16)
    n_time = rc.score_timing_n
    score_time = None
    if n_time > 0:
        timed = [responses[i % len(responses)] for i in range(n_time)]
        scorer.score([timed[0][0]], [timed[0][1]])  # warm-up (allocator, CUDA kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        timed_scores = scorer.score([t[0] for t in timed], [t[1] for t in timed], batch_size=bs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        score_time = time.perf_counter() - t0
    if n_time >= len(responses):  # the timed batch already covers every response once
        scores = timed_scores[: len(responses)].float().cpu()
    else:
        scores = scorer.score([t[0] for t in responses], [t[1] for t in responses], batch_size=bs).float().cpu()
    mean = scores.mean(0)  # (K,)
    std = scores.std(0, unbiased=False)  # (K,)
    held = torch.tensor([t[2] for t in responses])
    corr = correlation(scores[held]) if int(held.sum()) >= 2 else None

    # How the holistic label weighs the objectives: LR on z-scored per-objective reward differences.
    reg = None
    if has_holistic:
        both = [p for p in pairs if HOLISTIC in p.p]
        X, y = [], []
        for adapter in dict.fromkeys(adapter_of[o] for o in objectives):
            objs = [o for o in objectives if adapter_of[o] == adapter]
            ra, rb, _, _ = _pair_rewards(model, heads[adapter], tok, both, objs, rc.max_length, device, rc.batch_size)
            X.append(ra - rb)  # (P, k)
        Xd = torch.cat(X, 1) / std.clamp(min=1e-3)  # (P, K) differences in z units, as the scalarizers see them
        y = torch.tensor([p.p[HOLISTIC] for p in both])
        w = logistic_regression(Xd, y)
        reg = {o: float(w[k]) for k, o in enumerate(objectives)}

    # Save: adapters (safetensors through PEFT), heads (safetensors), objectives list, norm stats.
    models.save_adapter(model, tok, out / "model", base=backbone_name)
    save_file({f"{a}.{n}": t.detach().float().cpu().contiguous() for a, h in heads.items()
               for n, t in h.state_dict().items()}, str(out / "heads.safetensors"))
    write_json(out / "objectives.json", {
        "layout": rc.layout, "objectives": objectives, "adapters": adapter_of, "backbone": backbone_name,
        "baseline_adapter": BASELINE_ADAPTER if do_baseline else None, "max_length": rc.max_length,
    })
    write_json(out / "norm.json", {
        "objectives": objectives, "mean": {o: float(mean[k]) for k, o in enumerate(objectives)},
        "std": {o: float(std[k]) for k, o in enumerate(objectives)}, "n_responses": len(responses),
    })
    metrics = {
        "objectives": objectives,
        "layout": rc.layout,
        "backbone": backbone_name,
        "accuracy": accuracy,
        "single_objective_accuracy": single_acc,
        "correlation": corr,
        "regression_weights": reg,
        "n_pairs": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "n_eval_decisive": n_eval,
        "train_time_s": round(times["layout"], 3),
        "baseline_train_time_s": round(times["baseline"], 3) if do_baseline else None,
        "score_time_s": None if score_time is None else round(score_time, 4),
        "score_time_n": n_time,
        "training": train_stats,
        "processes": accelerator.num_processes,
        "param_checksums": checksums,
        "notes": [
            "accuracy: held-out pairs, against the label's majority side; p_a = 0.5 ties excluded, equal rewards count 0.5",
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
    return {k: metrics[k] for k in ("accuracy", "single_objective_accuracy", "train_time_s", "score_time_s")}


def run(cfg, run_dir: Path) -> Path:
    """Stage `rm`: RUN/feedback/labels.jsonl -> RUN/rm/."""
    run_dir = Path(run_dir)
    labels = run_dir / "feedback" / "labels.jsonl"
    if not labels.is_file():
        raise InputError("labels not found: run `morlaif feedback --run DIR` first", file=str(labels))
    sections = ("model", "constitution", "rm")
    return run_stage("rm", run_dir / "rm", config={s: getattr(cfg, s).model_dump(mode="json") for s in sections},
                     config_hash=cfg.section_hash(*sections), inputs=[labels],
                     body=lambda out: train(cfg, labels, out))


def score_cli(cfg, run_dir: Path, prompt: str, response: str) -> int:
    """`morlaif score`: per-objective raw and normalised rewards and the scalarized reward of one response."""
    from morlaif.scalarize import scalarize, weight_vector

    if not prompt.strip():
        raise InputError("empty prompt", key="--prompt")
    scorer = RewardScorer.load(run_dir, cfg)
    raw = scorer.score([prompt], [response]).float().cpu()  # (1, K)
    z = scorer.normalize(raw) if scorer.mean is not None else None
    w = weight_vector(cfg.rl.weights, scorer.objectives)
    use = z if (cfg.rl.normalize and z is not None) else raw
    s = scalarize(cfg.rl.scalarizer, use, w, tau=cfg.rl.tau, lam=cfg.rl.lam, q=cfg.rl.q)  # (1,)
    width = max(len(o) for o in scorer.objectives)
    print(f"{'objective':{width}s}  {'raw':>9s}  {'normalised':>10s}")
    for k, o in enumerate(scorer.objectives):
        zs = f"{float(z[0, k]):10.4f}" if z is not None else f"{'n/a':>10s}"
        print(f"{o:{width}s}  {float(raw[0, k]):9.4f}  {zs}")
    print(f"scalarized ({cfg.rl.scalarizer}, {'normalised' if use is z else 'raw'} rewards): {float(s[0]):.4f}")
    return 0
