"""Batched chat generation: our own decode loop, with explicit end-of-sequence handling.

SmolLM2 pads with its EOS token, so we never infer the response end from padding: each
response is cut at its first EOS, and `response_lengths` counts tokens up to and including it.

Why not `model.generate`: a batch there runs until its longest row ends, every finished row
still paying for its forward pass. `decode` drops a row from the batch (and from the KV cache)
as soon as it samples EOS, so refusals of a dozen tokens cost a dozen steps, not max_new_tokens;
and it skips the processors a setting turns off (no sort over the vocabulary for top_p = 1).
The sampling rules are HF's (temperature, then top-p, then multinomial; repetition penalty as in
CTRL over the prompt and the response so far); greedy decoding gives `generate`'s tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from morlaif.config import Config
from morlaif.constitution import aspect_questions

Messages = list[dict[str, str]]


def chat(prompt: str, system: str | None = None, history: Messages | None = None) -> Messages:
    """One user turn (optionally after a system message and earlier turns) as chat messages."""
    msgs: Messages = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs += history or []
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> str:
    """Messages -> prompt text through the tokenizer's chat template (plain text when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


Purpose = Literal["generate", "candidates", "sft_target", "pair", "followup", "eval", "rollout"]
PURPOSES: tuple[str, ...] = get_args(Purpose)


@dataclass(frozen=True)
class Sampling:
    """How one kind of text is sampled: the arguments of `generate` (and, less batch_size, of
    `generate_batch`). `Sampling.from_config(cfg, purpose)` is the one place that says which config
    keys set them for each purpose; a call site that needs another length or temperature (a
    critique's tokens, `--temperature`) takes `s.replace(...)` of it."""

    temperature: float
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Config, purpose: Purpose) -> Sampling:
        """The sampling of `purpose`:

        generate    `morlaif generate`: the generation section as it is
        candidates  best-of-N (`generate --best-of`, `morlaif steer`): the same, never greedy (N copies of one)
        sft_target  the SL stage's writer (initial answers, critiques, revisions; sft.* set their lengths)
        pair        the feedback stage's pair responses
        followup    a policy's answer to an aspect objective's follow-up question, wherever one is answered
        eval        the evaluation's responses (greedy by default)
        rollout     PPO/GRPO/RLOO rollouts
        """
        g, fb, rl = cfg.generation, cfg.feedback, cfg.rl
        by_purpose = {
            "generate": cls(g.temperature, g.top_p, g.repetition_penalty, g.max_new_tokens, g.batch_size),
            "candidates": cls(g.temperature or 1.0, g.top_p, g.repetition_penalty, g.max_new_tokens, g.batch_size),
            "sft_target": cls(g.temperature, g.top_p, g.repetition_penalty, g.max_new_tokens, g.batch_size),
            "pair": cls(fb.temperature, g.top_p, g.repetition_penalty, fb.max_new_tokens or g.max_new_tokens,
                        g.batch_size),
            # One policy wherever a follow-up is answered: labelling (feedback), RL scoring (PPO, GRPO/RLOO,
            # DPO relabelling), eval, best-of-N and `morlaif score`. The answer is part of what the aspect's
            # preference model reads, so it must come from one distribution where the model learns (the
            # labels) and where it scores; in RL that score is a reward the policy gradient sees, so the
            # distribution is the policy's own: nothing cut (top_p 1), nothing penalised (repetition
            # penalty 1), as rollouts are sampled. The temperature is the labels' (feedback.temperature):
            # later stages answer as the preference models learnt, and tuning rl.temperature does not
            # change what the labels were made from.
            "followup": cls(fb.temperature, 1.0, 1.0, fb.followup_max_new_tokens, g.batch_size),
            "eval": cls(cfg.eval.temperature, g.top_p, g.repetition_penalty, cfg.eval.max_new_tokens, g.batch_size),
            # top_p 1, no repetition penalty: sample from the policy itself (the policy gradient assumes it;
            # PPO's ratio needs the true sampling distribution)
            "rollout": cls(rl.temperature, 1.0, 1.0, rl.max_new_tokens, rl.batch_size),
        }
        if purpose not in by_purpose:
            raise ValueError(f"unknown sampling purpose {purpose!r} (one of {', '.join(PURPOSES)})")
        return by_purpose[purpose]

    def replace(self, **changes) -> Sampling:
        """A copy with `changes` (field=value)."""
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict:
        """Keyword arguments of `generate` (and `followup_answers`)."""
        return dataclasses.asdict(self)

    def batch_kwargs(self) -> dict:
        """Keyword arguments of `generate_batch` (one batch: no batch_size)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


@dataclass
class Generated:
    texts: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded prompt ids
    response_ids: torch.Tensor  # (B, T) response ids, padded with pad_token_id after EOS
    response_lengths: torch.Tensor  # (B,) tokens up to and including the first EOS (or T)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as HF applies it): logits (b, V) of tokens in seen (b, L) are divided
    by `penalty` when positive and multiplied by it when negative."""
    score = logits.gather(1, seen)  # (b, L)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row from logits (b, V): argmax at temperature 0, else top-p sampling (global RNG)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:  # drop the least likely tokens whose total mass is at most 1 - top_p (HF's rule)
        sorted_logits, sorted_idx = logits.sort(-1)  # (b, V) ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)  # (b,)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos_ids: set[int],
           pad_id: int, temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           static_cache: bool = False) -> torch.Tensor:
    """Sample responses to left-padded prompts (B, P); returns (B, T) token ids, pad_id after each row's EOS.

    A row leaves the batch (and the KV cache) at its EOS, so the cost of a step is that of the live
    rows. Models whose cache cannot drop rows fall back to keeping them (same tokens, more compute).
    static_cache: the KV cache is allocated once for P + max_new_tokens positions (HF's StaticCache)
    instead of growing by concatenation every step; `morlaif bench` measures which is faster where.
    """
    B, P = input_ids.shape
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)  # (B, T)
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    live = torch.arange(B, device=input_ids.device)  # (b,) original row of each live row
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P) left padding: positions start at 0
    # repetition penalty looks at each row's real tokens; padding slots repeat the row's last token (harmless)
    seen = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:]) if repetition_penalty != 1.0 else None
    extra: dict = {}
    if static_cache:
        extra = {"past_key_values": StaticCache(config=model.config, max_cache_len=P + max_new_tokens),
                 "cache_position": torch.arange(P, device=input_ids.device)}
    res = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **extra)
    cache, mask, next_pos = res.past_key_values, attention_mask, pos[:, -1] + 1  # next_pos (b,)
    can_drop = not static_cache and hasattr(cache, "batch_select_indices")  # a static cache keeps its batch
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # only used when rows cannot be dropped
    for t in range(max_new_tokens):
        logits = res.logits[:, -1].float()  # (b, V)
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        tok = pick_tokens(logits, temperature, top_p)  # (b,)
        if not can_drop:  # finished rows stay in the batch: their samples are discarded
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out[live, t] = tok
        finished = torch.isin(tok, eos) if can_drop else torch.isin(tok, eos) | done  # (b,)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        if can_drop and bool(finished.any()):  # the finished rows leave the batch
            keep = (~finished).nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            live, tok, mask, next_pos = live[keep], tok[keep], mask[keep], next_pos[keep]
            seen = seen[keep] if seen is not None else None
        elif not can_drop:
            done = finished
        if seen is not None:
            seen = torch.cat([seen, tok[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)  # (b, P + t + 1)
        if static_cache:  # where the step's keys and values go in the preallocated cache
            extra["cache_position"] = torch.tensor([P + t], device=input_ids.device)
        res = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True, **{k: v for k, v in extra.items() if k != "past_key_values"})
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    conversations: Sequence[Messages | str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    static_cache: bool = False,
) -> Generated:
    """One generate() call over a batch of conversations (or already-rendered prompt strings)."""
    prompts = [c if isinstance(c, str) else render(tokenizer, c) for c in conversations]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    eos_ids = _eos_ids(tokenizer, model)
    resp = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                  pad_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                  repetition_penalty=repetition_penalty, static_cache=static_cache)  # (B, max_new_tokens)
    is_eos = torch.isin(resp, torch.tensor(sorted(eos_ids), device=resp.device))  # (B, T)
    T = resp.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    lengths = torch.clamp(first + 1, max=T)  # include the EOS token itself
    T = int(lengths.max())
    resp = resp[:, :T]  # (B, T): as wide as the longest response
    pos = torch.arange(T, device=resp.device)[None]  # (1, T)
    resp = torch.where(pos < lengths[:, None], resp, torch.full_like(resp, tokenizer.pad_token_id))
    texts = [tokenizer.decode(r[: int(n)], skip_special_tokens=True).strip() for r, n in zip(resp, lengths)]
    return Generated(texts, enc["input_ids"], resp, lengths)


def _eos_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


def generate(
    model,
    tokenizer,
    conversations: Sequence[Messages | str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Generate one response per conversation, in batches, with a progress bar.

    Batches are sorted by prompt length (less padding) and results returned in input order.
    Each batch is seeded with `seed + batch index`, so a resumed run reproduces the same batches.
    """
    order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    out: list[str | None] = [None] * len(conversations)
    bar = tqdm(total=len(conversations), desc=desc, disable=not progress, leave=False)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        g = generate_batch(
            model,
            tokenizer,
            [conversations[i] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=None if seed is None else seed + b,
        )
        for i, t in zip(idx, g.texts):
            out[i] = t
        bar.update(len(idx))
    bar.close()
    return [t or "" for t in out]


def followup_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    aspects: Sequence[str],
    *,
    seed: int,
    sampling: Sampling,
    contexts: Sequence[tuple[str | None, Messages]] | None = None,
) -> dict[str, list[str]]:
    """{aspect: the policy's answer to the aspect's follow-up question, per (prompt, response)}.

    The question (data/constitutions/aspects.yaml) is asked as the next user turn after the
    response, the way the feedback stage asks it before the answer is judged and the preference
    models train on it; `contexts[i]` = (system, earlier turns) puts the conversation where it was
    (contrastive demonstrations). Aspect j of `aspects` samples with seed + 101 (j + 1).
    Every stage that scores an aspect objective gets its follow-up answers here, sampled with
    `Sampling.from_config(cfg, "followup")`.
    """
    questions = aspect_questions()
    contexts = contexts or [(None, [])] * len(prompts)
    out: dict[str, list[str]] = {}
    for j, aspect in enumerate(aspects):
        convs = [chat(questions[aspect], system=system, history=[*history, {"role": "user", "content": p},
                                                                 {"role": "assistant", "content": r}])
                 for (system, history), p, r in zip(contexts, prompts, responses)]
        out[aspect] = generate(model, tokenizer, convs, **sampling.kwargs(), seed=seed + 101 * (j + 1), progress=False)
    return out
