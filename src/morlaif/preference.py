"""The preference models: one reward per objective from a LoRA backbone and linear heads.

The rm stage (`morlaif.reward`) trains them; PPO, GRPO/RLOO, DPO relabelling, evaluation,
best-of-N and `morlaif score` use them through `RewardScorer`. Everything both sides must agree
on lives here: the loss, the adapters and heads, how a (prompt, response) becomes the text the
model reads, and where the reward is read (the last real token).

Loss: Bradley-Terry with soft labels, L = -[p log σ(r_a - r_b) + (1 - p) log σ(r_b - r_a)].

Layouts:
- `multihead`: one LoRA adapter and one Linear(hidden, K) head: all K rewards in one forward pass.
- `separate`: one LoRA adapter + Linear(hidden, 1) head per objective (the MORLAIF paper's layout),
  all on one frozen copy of the backbone (PEFT multi-adapter): K forward passes, one model in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from morlaif import models
from morlaif.artifacts import confine, read_json
from morlaif.constitution import HOLISTIC, aspect_questions, configured_objectives
from morlaif.errors import InputError
from morlaif.generation import render
from morlaif.processes import pick_device
from morlaif.scalarize import normalize

MULTIHEAD_ADAPTER = "multihead"
BASELINE_ADAPTER = HOLISTIC  # the single-objective baseline adapter is named after its label

# ----------------------------------------------------------------------------- loss


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


# ----------------------------------------------------------------------------- backbone, adapters, heads


def load_backbone(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
                  load_in_4bit: bool = False):
    """The transformer body without its LM head (no wasted vocab projection): AutoModel, or the
    body of a merged adapter directory. `load_in_4bit`: its weights in 4-bit (QLoRA; CUDA)."""
    from transformers import AutoModel

    path = models.resolve(name)
    if models.is_adapter(path):
        lm = models.load_model(name, device=str(device.type), dtype=str(dtype).removeprefix("torch."),
                               trust_remote_code=trust_remote_code, load_in_4bit=load_in_4bit)
        body = lm.merge_and_unload().base_model
    else:  # models.resolve has already refused names that are neither a local path nor a hub id
        quant = models.quantization_kwargs(device, dtype) if load_in_4bit else {}
        body = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **quant)
    body.config.use_cache = False
    return body if load_in_4bit else body.to(device)


def load_scoring_tokenizer(name: str, trust_remote_code: bool):
    """The tokenizer as the preference models read text: padding on the right (`models.load_tokenizer`,
    for generation, pads on the left) and truncation from the left."""
    tok = models.load_tokenizer(name, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # natural position ids; the last real token is found from the mask
    tok.truncation_side = "left"  # keep the end of the response, where the reward is read
    return tok


def lora_config(r: int, model_type: str, targets: list[str] | str | None = None):
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    # rm.lora_target_modules; null: PEFT's per-architecture default targets (q/v projections for
    # Llama, query/value for BERT), every linear layer for an architecture it has no default for.
    if targets is None:
        targets = None if model_type in DEFAULT_TARGETS else "all-linear"
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, bias="none")


def add_adapter(backbone, model, name: str, r: int, targets: list[str] | str | None = None):
    """Attach one more LoRA adapter; the first call wraps the backbone into a PeftModel."""
    from peft import get_peft_model

    cfg = lora_config(r, getattr(backbone.config, "model_type", ""), targets)
    if model is None:
        return get_peft_model(backbone, cfg, adapter_name=name)
    model.add_adapter(name, cfg)
    return model


def make_head(hidden: int, k: int, seed: int) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, k, bias=False)  # no bias: BT sees only reward differences, a bias never learns
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden), generator=g)
    return head


# ----------------------------------------------------------------------------- what the model reads
# An action objective reads (prompt, response). An aspect objective (`principle:motivation`,
# `principle:consequence`) reads the policy's answer to the aspect's follow-up question too, as the
# next two turns: the transcript the feedback stage judged and the rm stage trained on. Both the
# training texts (`pair_texts`) and the texts scored at use (`RewardScorer.score`) come from
# `objective_text`, so a pair reads the same whichever side of the pipeline scores it.


def aspect(objective: str) -> str | None:
    """The aspect whose follow-up answer an objective reads: None for the action aspect."""
    a = objective.partition(":")[2]
    return None if a in ("", "action") else a


def aspects(objectives) -> list[str]:
    """The follow-up aspects of a list of objectives, sorted: what a caller must answer before scoring."""
    return sorted({a for o in objectives if (a := aspect(o)) is not None})


def objective_text(tok, prompt: str | list[dict], response: str, followup: tuple[str, str] | None = None) -> str:
    """(prompt, response[, follow-up question, follow-up answer]) as one chat transcript. A prompt is one
    user turn, or the turns of a dialogue so far (chat messages ending with the user's)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    msgs.append({"role": "assistant", "content": response})
    if followup is not None:
        msgs += [{"role": "user", "content": followup[0]}, {"role": "assistant", "content": followup[1]}]
    return render(tok, msgs, add_generation_prompt=False)


def pair_texts(tok, pairs: list, objectives: list[str]):
    """Texts to forward for a batch of labelled pairs and, per (pair, objective), the rows of side a and b.

    pairs: objects with prompt, response_a, response_b, p {objective: p_a}, followups
    {objective: (answer_a, answer_b)} and weight {objective: w, default 1} (`reward.Pair`). Action
    objectives (and aspects without follow-up answers) score (prompt, response); aspects with follow-ups
    score the transcript with the follow-up turn. Identical texts are forwarded once, so with action
    objectives a batch of B pairs costs 2B sequences whatever K is.
    Returns (texts, idx_a (B, K), idx_b (B, K), p_a (B, K), mask (B, K): 0 without a label, else its weight).
    """
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
                ta = objective_text(tok, pair.prompt, pair.response_a, (q, fu[0]))
                tb = objective_text(tok, pair.prompt, pair.response_b, (q, fu[1]))
            else:
                ta = objective_text(tok, pair.prompt, pair.response_a)
                tb = objective_text(tok, pair.prompt, pair.response_b)
            ra.append(texts.setdefault(ta, len(texts)))
            rb.append(texts.setdefault(tb, len(texts)))
            has = obj in pair.p
            pp.append(pair.p.get(obj, 0.5))
            mm.append(pair.weight.get(obj, 1.0) if has else 0.0)  # the label's weight in the loss
        idx_a.append(ra)
        idx_b.append(rb)
        p.append(pp)
        mask.append(mm)
    return (list(texts), torch.tensor(idx_a), torch.tensor(idx_b), torch.tensor(p), torch.tensor(mask))


def encode(tok, texts: list[str], max_length: int, device):
    special = not getattr(tok, "chat_template", None)  # a chat template already writes BOS/EOS-like tokens
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
              add_special_tokens=special)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ----------------------------------------------------------------------------- the reward


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state (N, H) of the last real token of each row of hidden (N, T, H).

    Found from the attention mask, never from `!= pad` (SmolLM2 pads with its EOS, which is also a
    real token at the end of every turn). Works for left or right padding.
    """
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)[None]  # (1, T)
    last = (attention_mask.long() * (pos + 1)).argmax(1)  # (N,) index of the last 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, H)


def rewards(model, head, input_ids, attention_mask) -> torch.Tensor:
    """(N, K_head) rewards from the active adapter and its head."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = last_token_hidden(out.last_hidden_state, attention_mask)  # (N, H)
    return head(h.float())  # (N, K) heads run in fp32 whatever the backbone dtype


class RewardNet(torch.nn.Module):
    """Backbone (active adapter) + head as one module: what `accelerator.prepare` wraps in DDP."""

    def __init__(self, model, head: torch.nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids, attention_mask):
        return rewards(self.model, self.head, input_ids, attention_mask)


# ----------------------------------------------------------------------------- the trained models


def check_trained_objectives(run_dir: str | Path, cfg) -> list[str]:
    """The objectives cfg asks for, after checking that RUN/rm's preference models were trained for them."""
    meta_path = Path(run_dir) / "rm" / "objectives.json"
    trained = read_json(meta_path)["objectives"]
    wanted = [o.name for o in configured_objectives(cfg.constitution)]
    missing = [o for o in wanted if o not in trained]
    if missing:
        raise InputError(f"the config asks for objective(s) {missing} but the preference models in {meta_path.parent} "
                         f"were trained for {trained}; re-run `morlaif rm`", file=str(meta_path),
                         key="constitution.objectives")
    return wanted


def load_trained(rm: str | Path, adapters: list[str], device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool, load_in_4bit: bool = False):
    """The trained preference model in RUN/rm with the named adapters: (the backbone with those LoRA
    adapters, in eval mode; {adapter: its Linear head (K, H) on `device`}). The one loader of a trained
    rm directory: `RewardScorer.load` (every stage that scores) and `morlaif export --stage rm` use it.
    Adapter names come from a file: confined to rm/model/, weights read from safetensors only."""
    from peft import PeftModel

    rm = Path(rm)
    backbone = load_backbone(read_json(rm / "objectives.json")["backbone"], device, dtype, trust_remote_code,
                             load_in_4bit)
    model = None
    for a in adapters:
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
    return model, heads


class RewardScorer:
    """Per-objective rewards of (prompt, response) pairs from the trained preference models.

    score() returns raw rewards (B, K) on `self.device`, in `self.objectives` order; an aspect
    objective reads the follow-up answers passed for its aspect (`self.aspects`; the policy's
    answers from `generation.followup_answers`). multihead is one forward pass per batch and text
    (the response; each aspect's transcript), separate one per objective. normalize() z-scores with
    RUN/rm/norm.json.
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
        device = pick_device(cfg.model.device)
        dtype = models.pick_dtype(cfg.model.dtype, device)
        model, heads = load_trained(rm, adapters, device, dtype, cfg.model.trust_remote_code, cfg.model.load_in_4bit)
        tok = load_scoring_tokenizer(str(rm / "model"), cfg.model.trust_remote_code)
        mean = std = None
        norm_path = rm / "norm.json"
        if norm_path.is_file():
            norm = read_json(norm_path)
            if not baseline:
                mean = [norm["mean"][o] for o in wanted]
                std = [norm["std"][o] for o in wanted]
            elif norm.get(HOLISTIC):  # absent from an rm stage that predates the holistic statistics
                mean, std = [norm[HOLISTIC]["mean"]], [norm[HOLISTIC]["std"]]
        return cls(model, tok, heads, layout, wanted, adapters, columns, mean, std, meta["max_length"], device)

    @property
    def aspects(self) -> list[str]:
        return aspects(self.objectives)

    def texts(self, prompts: list[str], responses: list[str], aspect_: str | None = None,
              answers: list[str] | None = None) -> list[str]:
        """What the objectives of `aspect_` (None: the action aspect) read for each (prompt, response);
        an aspect's objectives read the follow-up `answers` too."""
        if aspect_ is None:
            return [objective_text(self.tok, p, r) for p, r in zip(prompts, responses)]
        question = aspect_questions()[aspect_]
        return [objective_text(self.tok, p, r, (question, a)) for p, r, a in zip(prompts, responses, answers)]

    @torch.no_grad()  # not inference_mode: callers may modify the result in place inside autograd code
    def score(self, prompts: list[str], responses: list[str], followups: dict[str, list] | None = None,
              batch_size: int = 32) -> torch.Tensor:
        """Raw rewards (B, K) of each (prompt, response), on self.device.

        followups: {aspect: the policy's follow-up answer per response} for every aspect in self.aspects.
        An answer None (a labelled pair that has none for this aspect) gives NaN for that row's
        objectives of the aspect.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        self.model.eval()
        out = torch.full((len(prompts), len(self.objectives)), float("nan"), device=self.device)
        groups: dict[str | None, list[int]] = {}  # aspect -> the columns (objectives) that read its text
        for k, o in enumerate(self.objectives):
            groups.setdefault(aspect(o), []).append(k)
        for aspect_, cols in groups.items():
            rows, answers = list(range(len(prompts))), None
            if aspect_ is not None:
                answers = (followups or {}).get(aspect_)
                if answers is None or len(answers) != len(prompts):
                    raise ValueError(f"the {aspect_} objectives read the policy's answer to their follow-up question: "
                                     f"pass followups['{aspect_}'] with one answer per response")
                rows = [i for i, a in enumerate(answers) if a is not None]
                answers = [answers[i] for i in rows]
            texts = self.texts([prompts[i] for i in rows], [responses[i] for i in rows], aspect_, answers)
            r = self._forward(texts, cols, batch_size)  # (len(rows), len(cols))
            if len(rows) == len(prompts):
                out[:, cols] = r
            elif rows:
                out[torch.tensor(rows, device=self.device)[:, None], torch.tensor(cols, device=self.device)] = r
        return out

    def _forward(self, texts: list[str], cols: list[int], batch_size: int) -> torch.Tensor:
        """Rewards (N, len(cols)) of objectives `cols` on `texts`."""
        out = torch.empty(len(texts), len(cols), device=self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = encode(self.tok, [texts[i] for i in idx], self.max_length, self.device)
            if self.layout == "multihead":
                self.model.set_adapter(MULTIHEAD_ADAPTER)
                heads = [self.columns[k] for k in cols]
                r = rewards(self.model, self.heads[MULTIHEAD_ADAPTER], ids, mask)[:, heads]  # (b, k)
            else:
                per_objective = []
                for k in cols:  # one forward pass per objective: the cost of this layout
                    self.model.set_adapter(self.adapters[k])
                    per_objective.append(rewards(self.model, self.heads[self.adapters[k]], ids, mask))  # (b, 1)
                r = torch.cat(per_objective, 1)  # (b, k)
            out[torch.tensor(idx, device=self.device)] = r
        return out

    def normalize(self, r: torch.Tensor) -> torch.Tensor:
        """(B, K) z-scored with the per-objective mean/std of the SFT policy's responses."""
        if self.mean is None:
            raise InputError(f"no normalisation statistics in rm/norm.json for {', '.join(self.objectives)} (an rm "
                             f"stage from before they were recorded): re-run `morlaif rm`, or set rl.normalize=false",
                             key="rl.normalize")
        return normalize(r, self.mean.to(r.device), self.std.to(r.device))


def reward_scorer(run_dir: str | Path, cfg) -> RewardScorer:
    """The preference model(s) the rl stage learns from (rl.reward_model): the K per-objective models, or
    the single-objective baseline on the holistic label."""
    if cfg.rl.reward_model == "holistic":
        return RewardScorer.load(run_dir, cfg, baseline=True)
    return RewardScorer.load(run_dir, cfg)
