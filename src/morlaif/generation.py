"""Batched chat generation with explicit end-of-sequence handling.

SmolLM2 pads with its EOS token, so we never infer the response end from padding: each
response is cut at its first EOS, and `response_lengths` counts tokens up to and including it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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


@dataclass
class Generated:
    texts: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded prompt ids
    response_ids: torch.Tensor  # (B, T) response ids, padded with pad_token_id after EOS
    response_lengths: torch.Tensor  # (B,) tokens up to and including the first EOS (or T)


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
) -> Generated:
    """One generate() call over a batch of conversations (or already-rendered prompt strings)."""
    prompts = [c if isinstance(c, str) else render(tokenizer, c) for c in conversations]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    do_sample = temperature > 0
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    out = model.generate(**enc, **kwargs)
    P = enc["input_ids"].shape[1]
    resp = out[:, P:]  # (B, T)
    eos_ids = _eos_ids(tokenizer, model)
    is_eos = torch.isin(resp, torch.tensor(sorted(eos_ids), device=resp.device))  # (B, T)
    T = resp.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    lengths = torch.clamp(first + 1, max=T)  # include the EOS token itself
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
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    batch_size: int = 16,
    contexts: Sequence[tuple[str | None, Messages]] | None = None,
) -> dict[str, list[str]]:
    """{aspect: the policy's answer to the aspect's follow-up question, per (prompt, response)}.

    The question (data/constitutions/aspects.yaml) is asked as the next user turn after the
    response, the way the feedback stage asks it before the answer is judged and the preference
    models train on it; `contexts[i]` = (system, earlier turns) puts the conversation where it was
    (contrastive demonstrations). Aspect j of `aspects` samples with seed + 101 (j + 1).
    Every stage that scores an aspect objective gets its follow-up answers here.
    """
    questions = aspect_questions()
    contexts = contexts or [(None, [])] * len(prompts)
    out: dict[str, list[str]] = {}
    for j, aspect in enumerate(aspects):
        convs = [chat(questions[aspect], system=system, history=[*history, {"role": "user", "content": p},
                                                                 {"role": "assistant", "content": r}])
                 for (system, history), p, r in zip(contexts, prompts, responses)]
        out[aspect] = generate(model, tokenizer, convs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                               seed=seed + 101 * (j + 1), progress=False)
    return out
