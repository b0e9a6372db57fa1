"""Pairwise judges: which of two responses better answers a comparison question?

The preference is read from the next-token probabilities of the option letters, never sampled:
the judge sees a multiple-choice prompt (templates judge.txt / judge_cot.txt) and we compare
the probability mass on "A" against "B" (with and without a leading space, summed, then
renormalised over the two letters). Small judges have a strong position bias (SmolLM2-135M
answers "A" whatever the order, as measured here), so every pair is asked in both orders and averaged:

    p_a = (p_AB + 1 - p_BA) / 2

where p_AB = P(first option) with a shown first, p_BA = P(first option) with b shown first.
`consistent` says whether both orders name the same winner.

Worked comparisons (`feedback.judge_shots`, from the constitution's demonstrations) go before the
question as earlier chat turns answered with the right letter, alternately A and B: small models
follow examples better than instructions. The same turns precede every objective's question, so
the hf backend still shares each pair's prefix across objectives. Chain-of-thought prompts get none
(the turns answer with a bare letter, the chain-of-thought template asks for reasoning first).

Backends (selected by `cfg.feedback.backend` from a dict literal in `make_judge`):
- `hf`: a local transformers model, one forward pass per batch of prompts sorted by length,
  the LM head only at the last position (a (B, T, V) logits tensor would be GBs). The option
  letters' logits are computed in fp32 from the final hidden state whatever the model's dtype:
  bf16 logits of ~20 in magnitude come in steps of 0.125, which quantises P(A) to steps of ~0.03.
- `openai`: any OpenAI-compatible chat endpoint through httpx async with bounded concurrency,
  retries with exponential backoff (Retry-After honoured) on 429/5xx/timeouts/connection errors,
  top_logprobs when offered, else the letter parsed from the text. A reply with no readable
  letter is retried and then fails with `JudgeError`; it never becomes a label. The API key is
  read from the environment variable named in the config and only ever put in a request header.
  Several endpoints serving the same model (`base_url` as a list) share the requests (`ServerPool`).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Sequence

import httpx
import torch
from tqdm.auto import tqdm

from morlaif import models
from morlaif.constitution import load_constitution, load_template
from morlaif.errors import InputError, RunError
from morlaif.generation import chat, generate, render

LETTER_VARIANTS = {"A": ("A", " A"), "B": ("B", " B")}
TEMPLATES = {False: "judge.txt", True: "judge_cot.txt"}


class JudgeError(RunError):
    """The judge could not produce a valid preference (after retries)."""


# ----------------------------------------------------------------------------- pure functions


def debias(p_ab: float, p_ba: float) -> float:
    """Swap-averaged P(a preferred): p_ab = P(first) with a first, p_ba = P(first) with b first."""
    return (p_ab + 1.0 - p_ba) / 2.0


def is_consistent(p_ab: float, p_ba: float) -> bool:
    """Both orders name the same winner (a ties at exactly 0.5 names no winner: inconsistent)."""
    return (p_ab > 0.5 and p_ba < 0.5) or (p_ab < 0.5 and p_ba > 0.5)


def letter_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the single-token spellings of each letter ("A", " A"; "B", " B")."""
    out = []
    for letter in ("A", "B"):
        ids = []
        for v in LETTER_VARIANTS[letter]:
            enc = tokenizer.encode(v, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise InputError(f"the judge tokenizer has no single token for the option letter {letter}", key="model.feedback")
        out.append(ids)
    return out[0], out[1]


def letter_logits(hidden: torch.Tensor, head: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits (N, len(ids)) of the tokens `ids` from final hidden states (N, H) and the LM head
    (a Linear with weight (V, H)): only len(ids) rows of the head, upcast, so the cost is nothing."""
    w = head.weight[list(ids)].float()  # (n, H)
    b = head.bias[list(ids)].float() if getattr(head, "bias", None) is not None else None
    return torch.nn.functional.linear(hidden.float(), w, b)  # (N, n)


def letter_probs(logits: torch.Tensor, ids_a: Sequence[int], ids_b: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits (N, V) -> (P(A | A or B), mass on A, mass on B), each (N,).

    The renormalised preference is sigmoid(logsumexp(logits_A) - logsumexp(logits_B)), which equals
    mass_A / (mass_A + mass_B) but stays finite when both masses underflow.
    """
    logits = logits.float()
    logp = logits.log_softmax(-1)  # (N, V)
    lse_a = logp[:, list(ids_a)].logsumexp(-1)  # (N,)
    lse_b = logp[:, list(ids_b)].logsumexp(-1)  # (N,)
    return torch.sigmoid(lse_a - lse_b), lse_a.exp(), lse_b.exp()


def parse_letter(text: str) -> str | None:
    """The option letter a judge wrote: the last 'Answer: X', else a reply that starts with A/B."""
    found = re.findall(r"answer\s*(?:is)?\s*[:\-]?\s*\(?\b([AB])\b", text, flags=re.IGNORECASE)
    if found:
        return found[-1].upper()
    m = re.match(r"^\W*(?:\(([AB])\)|([AB]))(?![A-Za-z])", text.strip())
    if m:
        return (m.group(1) or m.group(2)).upper()
    return None


def p_first_from_top_logprobs(top: list[dict]) -> float | None:
    """OpenAI-style top_logprobs [{token, logprob}] -> P(A | A or B), or None when neither letter is listed.

    A letter listed with a log-probability that is not a finite number <= 0 (NaN, inf, 3.0) makes the
    whole reply unusable: ValueError, so the caller retries instead of making a label of it.
    """
    mass = {"A": 0.0, "B": 0.0}
    for t in top:
        tok = str(t.get("token", "")).strip().strip("(").strip(")")
        if tok not in mass:
            continue
        lp = t.get("logprob")
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-6:
            raise ValueError(f"invalid logprob {lp!r} for option {tok}")
        mass[tok] += math.exp(min(lp, 0.0))
    total = mass["A"] + mass["B"]
    return None if total <= 0.0 else mass["A"] / total


def _cut_reasoning(text: str) -> str:
    """Judge reasoning up to (not including) any answer line it wrote: we read the letter ourselves."""
    m = re.search(r"answer\s*:", text, flags=re.IGNORECASE)
    return (text[: m.start()] if m else text).rstrip()


# ----------------------------------------------------------------------------- judges


class Judge:
    """Common part: builds both orders and debiases. Backends implement `_p_first`."""

    model_name: str = ""

    def __init__(self, *, cot_max_new_tokens: int = 64, demos: Sequence[dict] = ()):
        self.cot_max_new_tokens = cot_max_new_tokens
        self.templates = {cot: load_template(name) for cot, name in TEMPLATES.items()}
        self.shots = shot_turns(self.templates[False], demos)

    def turns(self, text: str, chain_of_thought: bool) -> list[dict]:
        """Chat messages of one filled template: the worked comparisons, then the question."""
        return chat(text, history=None if chain_of_thought else self.shots)

    def template_hash(self, chain_of_thought: bool = False) -> str:
        """Identity of what the judge is shown besides the pair (template and worked comparisons): part
        of the label cache's key, so labels made with other shots are never reused."""
        shown = self.templates[chain_of_thought]
        if self.shots and not chain_of_thought:  # without shots: the template's hash, as labels cached before
            shown += json.dumps(self.shots)
        return hashlib.sha256(shown.encode()).hexdigest()[:16]

    def prefer(
        self,
        prompts: list[str],
        responses_a: list[str],
        responses_b: list[str],
        question: str | list[str],
        chain_of_thought: bool = False,
    ) -> list[dict]:
        """P(a preferred) per pair, asked in both orders; see module docstring for the keys."""
        n = len(prompts)
        questions = [question] * n if isinstance(question, str) else list(question)
        if not (len(responses_a) == len(responses_b) == len(questions) == n):
            raise ValueError("prompts, responses_a, responses_b and question must have the same length")
        if n == 0:
            return []
        tpl = self.templates[chain_of_thought]
        # The template up to the line holding {question} depends only on (prompt, a, b): every
        # objective asked about the same pair shares it, so the hf backend computes it once.
        cut = tpl.rfind("\n", 0, tpl.index("{question}")) + 1
        head_tpl, tail_tpl = tpl[:cut], tpl[cut:]
        heads, texts = [], []
        for first, second in ((responses_a, responses_b), (responses_b, responses_a)):  # order AB, then BA
            for p, x, y, q in zip(prompts, first, second, questions):
                head = head_tpl.format(prompt=p, response_a=x, response_b=y, question=q)
                heads.append(head)
                texts.append(head + tail_tpl.format(prompt=p, response_a=x, response_b=y, question=q))
        res = self._p_first(texts, chain_of_thought, heads)  # 2n (p_first, raw): first n in order AB, then BA
        out = []
        for i in range(n):
            (p_ab, raw_ab), (p_ba, raw_ba) = res[i], res[n + i]
            out.append({"p_a": debias(p_ab, p_ba), "p_ab": p_ab, "p_ba": p_ba,
                        "consistent": is_consistent(p_ab, p_ba), "raw": {"ab": raw_ab, "ba": raw_ba}})
        return out

    def _p_first(self, texts: list[str], chain_of_thought: bool, heads: list[str]) -> list[tuple[float, dict]]:
        """P(first option) and raw output per filled template; heads[i] is a prefix of texts[i] shared by many."""
        raise NotImplementedError

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """The judge model's own greedy answer to each prompt (one user turn, the model's default system
        message): what it would do, read for its refusal decision (feedback.refusal_labels)."""
        raise NotImplementedError

    def prefer_stream(self, items: list[dict], chain_of_thought: bool, chunk: int):
        """`prefer` over items {prompt, a, b, question}, yielding [(index in items, result)] one
        chunk at a time, so the caller can store each chunk before the next one is judged.
        (Ray's judge yields its workers' batches as they finish, in any order.)"""
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            res = self.prefer([it["prompt"] for it in part], [it["a"] for it in part], [it["b"] for it in part],
                              [it["question"] for it in part], chain_of_thought=chain_of_thought)
            yield list(enumerate(res, start))


class HFJudge(Judge):
    """Local transformers judge: batched forward passes, logits at the last position only.

    With `share_prefix` (default), rows whose token prefix (template + prompt + both responses) is
    the same are grouped: the prefix runs once, its KV cache is repeated per row, and only the
    short question tail (~40 tokens) runs per objective; the token prefix common to all rows (chat
    template opening, worked comparisons) runs once per call. Token ids are split from the full text's
    tokenization, so the result equals the plain forward pass up to float rounding.
    """

    def __init__(self, model, tokenizer, *, model_name: str, batch_size: int = 8, cot_max_new_tokens: int = 64,
                 share_prefix: bool = True, fp32_letters: bool = True, progress: bool = True,
                 demos: Sequence[dict] = ()):
        super().__init__(cot_max_new_tokens=cot_max_new_tokens, demos=demos)
        self.model, self.tok, self.model_name, self.batch_size = model, tokenizer, model_name, batch_size
        self.share_prefix = share_prefix
        self.fp32_letters = fp32_letters  # False: read the letters from the model-dtype logits (bench's baseline)
        self.ids_a, self.ids_b = letter_token_ids(tokenizer)
        self.forward_passes = 0
        self.progress = progress  # a bar over the prompts of each prefer() call

    def _last_hidden(self, **inputs) -> torch.Tensor:
        """Final hidden state (N, H) at the last position (the next-token slot), and the KV cache."""
        out = self.model.get_decoder()(**inputs)
        return out.last_hidden_state[:, -1], out.past_key_values

    def _read(self, hidden: torch.Tensor, rows: list[int], out: list, reasoning: list) -> None:
        head = self.model.get_output_embeddings()
        logits = head(hidden).float()  # (B, V) in the model's dtype: the normaliser and the top token only
        norm = logits.logsumexp(-1)  # (B,)
        if self.fp32_letters:
            lse_a = letter_logits(hidden, head, self.ids_a).logsumexp(-1)  # (B,) fp32
            lse_b = letter_logits(hidden, head, self.ids_b).logsumexp(-1)  # (B,) fp32
        else:
            lse_a, lse_b = logits[:, self.ids_a].logsumexp(-1), logits[:, self.ids_b].logsumexp(-1)  # (B,)
        p = torch.sigmoid(lse_a - lse_b)  # (B,) P(A | A or B), from fp32 letter logits
        mass_a, mass_b = (lse_a - norm).exp(), (lse_b - norm).exp()  # (B,) diagnostics
        top = logits.argmax(-1).tolist()
        for j, i in enumerate(rows):
            raw = {"mass_a": float(mass_a[j]), "mass_b": float(mass_b[j]), "top": self.tok.decode([top[j]])}
            if reasoning[i] is not None:
                raw["reasoning"] = reasoning[i]
            out[i] = (float(p[j]), raw)

    @torch.inference_mode()
    def _p_first(self, texts: list[str], chain_of_thought: bool, heads: list[str]) -> list[tuple[float, dict]]:
        self.model.eval()
        rendered = [render(self.tok, self.turns(t, chain_of_thought)) for t in texts]
        reasoning: list[str | None] = [None] * len(texts)
        out: list = [None] * len(texts)
        if chain_of_thought:
            # Greedy reasoning (deterministic, so cached labels stay reproducible), then the letter
            # is read after an "Answer:" we append ourselves.
            gen = generate(self.model, self.tok, rendered, batch_size=self.batch_size,
                           max_new_tokens=self.cot_max_new_tokens, temperature=0.0, progress=False)
            reasoning = [_cut_reasoning(g) for g in gen]
            rendered = [r + g + "\nAnswer:" for r, g in zip(rendered, reasoning)]
        # both orders of every pair: 2 prompts a pair
        bar = tqdm(total=len(rendered), desc="judge", unit="prompt", leave=False, disable=not self.progress)
        if self.share_prefix and not chain_of_thought and all(heads):  # a template asking first: no pair prefix
            self._shared(rendered, heads, out, reasoning, bar)
            bar.close()
            return out
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # similar lengths: less padding
        self.tok.padding_side = "left"  # the last position is the next-token slot for every row
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tok([rendered[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.model.device)
            hidden, _ = self._last_hidden(**enc, use_cache=False)  # (B, H)
            self.forward_passes += 1
            self._read(hidden, idx, out, reasoning)
            bar.update(len(idx))
        bar.close()
        return out

    @torch.inference_mode()
    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        self.model.eval()
        return generate(self.model, self.tok, [chat(p) for p in prompts], batch_size=self.batch_size,
                        max_new_tokens=max_new_tokens, temperature=0.0, progress=False)

    def _reference_ids(self) -> list[int]:
        """Token ids of the judge prompt with every field a NUL: its common prefix with a real row is what
        comes before the pair's prompt."""
        t = self.templates[False]
        text = t.format(prompt="\x00", response_a="\x00", response_b="\x00", question="\x00")
        return self.tok(render(self.tok, self.turns(text, False)), add_special_tokens=False)["input_ids"]

    def _shared(self, rendered: list[str], heads: list[str], out: list, reasoning: list, bar) -> None:
        dev, pad = self.model.device, self.tok.pad_token_id
        enc = self.tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}  # head ids -> [(row, tail ids)]
        for i, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            split = rendered[i].index(heads[i]) + len(heads[i])
            k = min(sum(1 for _, e in offs if e <= split), len(ids) - 1)  # keep >= 1 tail token
            groups.setdefault(tuple(ids[:k]), []).append((i, ids[k:]))
        order = sorted(groups, key=len)
        # What precedes every pair (the chat template's opening, the worked comparisons) is one token
        # prefix of all heads: it runs once, and each batch of heads continues a copy of its cache. It is
        # found against a reference row, never as the rows' own common prefix: where a call's rows split
        # must not depend on which rows share the call (Ray's batches, label chunks), or rounding would.
        ref = self._reference_ids()
        P = min(min(len(os.path.commonprefix([ref, list(g)])) for g in order), len(order[0]) - 1)
        pre = self._last_hidden(input_ids=torch.tensor([order[0][:P]], device=dev), use_cache=True)[1] if P else None
        batch: list[tuple] = []
        rows = 0  # rows (filled templates) under the heads in `batch`
        for g in order:
            batch.append(g)
            rows += len(groups[g])
            if rows >= self.batch_size or g is order[-1]:
                self._shared_batch(batch, groups, dev, pad, out, reasoning, P, pre)
                bar.update(rows)
                batch, rows = [], 0

    def _shared_batch(self, heads: list[tuple], groups: dict, dev, pad: int, out: list, reasoning: list,
                      P: int = 0, pre=None) -> None:
        """One batch of heads (token tuples whose first P tokens are the preamble, cached in `pre`)."""
        G, H = len(heads), max(len(h) - P for h in heads)
        head_ids = torch.tensor([[pad] * (H - len(h) + P) + list(h[P:]) for h in heads],
                                device=dev)  # (G, H) left-padded
        head_mask = torch.tensor([[1] * P + [0] * (H - len(h) + P) + [1] * (len(h) - P) for h in heads],
                                 device=dev)  # (G, P + H): padding sits between preamble and head, masked
        pos = (head_mask.cumsum(-1) - 1).clamp_min(0)[:, P:]  # (G, H) positions ignore the padding
        cache = None
        if pre is not None:
            cache = copy.deepcopy(pre)  # the head forward appends to the cache in place
            cache.batch_repeat_interleave(G)  # (1, ...) -> (G, ...)
        _, cache = self._last_hidden(input_ids=head_ids, attention_mask=head_mask, position_ids=pos,
                                     past_key_values=cache, use_cache=True)
        rows = [(gi, i, tail) for gi, h in enumerate(heads) for i, tail in groups[h]]
        sel = torch.tensor([gi for gi, _, _ in rows], device=dev)  # (R,) head of each row
        cache.batch_select_indices(sel)  # (G, ...) -> (R, ...): each row continues its head's cache
        T = max(len(t) for _, _, t in rows)
        tail_ids = torch.tensor([[pad] * (T - len(t)) + t for _, _, t in rows], device=dev)  # (R, T)
        tail_mask = torch.tensor([[0] * (T - len(t)) + [1] * len(t) for _, _, t in rows], device=dev)  # (R, T)
        mask = torch.cat([head_mask[sel], tail_mask], dim=1)  # (R, P + H + T): padding sits mid-row, masked
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, P + H:]  # (R, T)
        hidden, _ = self._last_hidden(input_ids=tail_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                      use_cache=True)  # (R, H)
        self.forward_passes += 1
        self._read(hidden, [i for _, i, _ in rows], out, reasoning)


class ServerPool:
    """Several endpoints serving the same model: each request goes to the server with the fewest
    requests in flight (ties in turn), skipping servers that are backed off after a failure.

    A server that fails (429, 5xx, timeout, connection error) is left alone for the retry wait
    (Retry-After or the exponential backoff), doubling while it keeps failing; its requests go to
    the others meanwhile. When every server is backed off, a retry waits for the first to come
    back. One event loop, no threads: no locks needed.
    """

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        self.in_flight = [0] * len(urls)
        self.down_until = [0.0] * len(urls)  # time.monotonic() before which the server is left alone
        self.sent = [0] * len(urls)  # requests per server (retries included)
        self._turn = 0

    def pick(self) -> int:
        now = time.monotonic()
        up = [i for i in range(len(self.urls)) if self.down_until[i] <= now]
        if not up:
            return min(range(len(self.urls)), key=lambda i: self.down_until[i])
        i = min(up, key=lambda i: (self.in_flight[i], (i - self._turn) % len(self.urls)))
        self._turn = (i + 1) % len(self.urls)
        return i

    def back_off(self, i: int, seconds: float) -> None:
        self.down_until[i] = max(self.down_until[i], time.monotonic() + seconds)

    def wait(self) -> float:
        """Seconds until some server takes requests again (0 while one does)."""
        return max(0.0, min(self.down_until) - time.monotonic())


class OpenAIJudge(Judge):
    """Any OpenAI-compatible /chat/completions endpoint (vLLM, llama.cpp server, hosted APIs), or
    several serving the same model (`ServerPool`)."""

    def __init__(self, ocfg, *, cot_max_new_tokens: int = 64, demos: Sequence[dict] = ()):
        super().__init__(cot_max_new_tokens=cot_max_new_tokens, demos=demos)
        self.cfg = ocfg
        self.model_name = openai_judge_name(ocfg)  # the config refuses credentials in the URL
        self.servers = ServerPool(ocfg.base_urls)
        self.requests = 0  # HTTP requests sent (retries included): for tests and throughput figures

    def _key(self) -> str | None:
        return os.environ.get(self.cfg.api_key_env) or None

    def _headers(self) -> dict:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def redact(self, text: str) -> str:
        """`text` with the API key masked: what an endpoint echoes back is kept in labels and error
        messages, and a proxy that echoes the request headers must not put the key there."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _payload(self, text: str, chain_of_thought: bool) -> dict:
        return {
            "model": self.cfg.model,
            "messages": self.turns(text, chain_of_thought),
            "max_tokens": self.cot_max_new_tokens if chain_of_thought else 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.cfg.top_logprobs,
        }

    @staticmethod
    def parse(body, chain_of_thought: bool) -> tuple[float, dict] | None:
        """Response JSON -> (P(first option), raw) or None when it holds no readable letter.

        Any JSON at all may come back (a proxy's error page, a truncated or reshaped body): whatever
        does not have the expected shape is None (retried), never an exception and never a label.
        """
        try:
            return OpenAIJudge._parse(body, chain_of_thought)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return None

    @staticmethod
    def _parse(body, chain_of_thought: bool) -> tuple[float, dict] | None:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            return None
        letter = parse_letter(text) if chain_of_thought else parse_letter(text[:8])
        content = ((choice.get("logprobs") or {}).get("content")) or []
        # The letter's position: the first token (no CoT) or the last A/B token after "Answer".
        pos = None
        if content and not chain_of_thought:
            pos = 0
        elif content:
            prefix = ""
            for k, t in enumerate(content):
                tok = str(t.get("token", ""))
                if tok.strip().strip("(") in ("A", "B") and re.search(r"answer\s*(?:is)?\s*:?\s*\(?$", prefix, re.I):
                    pos = k
                prefix += tok
        if pos is not None:
            p = p_first_from_top_logprobs(content[pos].get("top_logprobs") or [])
            if p is not None:
                return p, {"text": text, "source": "logprobs"}
        if letter is None:
            return None
        return (1.0 if letter == "A" else 0.0), {"text": text, "source": "text"}

    def _backoff(self, attempt: int) -> float:
        # Exponential backoff with jitter, capped: base * 2^attempt * U(0.5, 1.5).
        return min(self.cfg.backoff_max, self.cfg.backoff_base * 2**attempt * random.uniform(0.5, 1.5))

    async def _one(self, client, sem: asyncio.Semaphore, payload: dict, parse):
        """One request with retries; `parse(body)` -> the result, or None when the reply holds none (retried)."""
        pool = self.servers
        last, url = "", pool.urls[0]
        async with sem:
            for attempt in range(self.cfg.max_retries + 1):
                wait = self._backoff(attempt)
                i = pool.pick()
                url = pool.urls[i].rstrip("/") + "/chat/completions"
                pool.in_flight[i] += 1
                pool.sent[i] += 1
                self.requests += 1
                try:
                    # One deadline for the whole attempt: httpx's timeout is per read, so a server
                    # trickling a byte a second would otherwise hold the attempt open for ever.
                    r = await asyncio.wait_for(client.post(url, json=payload), timeout=self.cfg.timeout)
                except (httpx.TimeoutException, httpx.TransportError, asyncio.TimeoutError) as e:
                    last = type(e).__name__
                    pool.back_off(i, wait)  # the server is in trouble: the retry goes elsewhere if it can
                    wait = pool.wait()
                else:
                    if r.status_code in (408, 429) or r.status_code >= 500:
                        last = f"HTTP {r.status_code} {self.redact(r.text[:120])!r}"
                        ra = _retry_after(r.headers.get("retry-after"))
                        pool.back_off(i, min(self.cfg.backoff_max, ra) if ra is not None else wait)
                        wait = pool.wait()
                    elif r.status_code >= 400:  # 400/401/404: retrying will not help
                        raise JudgeError(f"openai judge: HTTP {r.status_code} from {url}: {self.redact(r.text[:200])}")
                    else:
                        try:
                            parsed = parse(r.json())
                        except ValueError:  # not JSON (truncated, an HTML error page)
                            parsed = None
                        if parsed is not None:
                            return parsed
                        # the model's answer, not the server's fault
                        last = f"no usable answer in the reply {self.redact(r.text[:120])!r}"
                finally:
                    pool.in_flight[i] -= 1
                if attempt < self.cfg.max_retries:
                    await asyncio.sleep(wait)
        raise JudgeError(f"openai judge: no valid answer from {url} after {self.cfg.max_retries + 1} attempts "
                         f"(last: {last})")

    def _letter(self, body, chain_of_thought: bool) -> tuple[float, dict] | None:
        parsed = self.parse(body, chain_of_thought)
        return None if parsed is None else (parsed[0], {**parsed[1], "text": self.redact(parsed[1]["text"])})

    def _text(self, body) -> str | None:
        """The reply's text (None when the body has none: retried)."""
        try:
            text = body["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return self.redact(text.strip()) if isinstance(text, str) and text.strip() else None

    async def _all(self, payloads: list[dict], parse) -> list:
        sem = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(headers=self._headers(), timeout=self.cfg.timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self._one(client, sem, p, parse) for p in payloads)))

    def _p_first(self, texts: list[str], chain_of_thought: bool, heads: list[str]) -> list[tuple[float, dict]]:
        return asyncio.run(self._all([self._payload(t, chain_of_thought) for t in texts],
                                     lambda body: self._letter(body, chain_of_thought)))

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        payloads = [{"model": self.cfg.model, "messages": chat(p), "max_tokens": max_new_tokens, "temperature": 0.0}
                    for p in prompts]
        return asyncio.run(self._all(payloads, self._text))


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare for APIs and treated as absent)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def judge_demos(cfg) -> list[dict]:
    """feedback.judge_shots worked comparisons {prompt, response_a, response_b, question, answer} from the
    demonstrations of the configured constitution: the k-th takes principle k mod n (of the n that have
    demonstrations) and its (k div n)-th positive/negative pair, the positive shown first for even k
    (answer A), second for odd k (answer B). Fewer when the demonstrations run out."""
    if not cfg.feedback.judge_shots:  # the default: no constitution to read for every judge built
        return []
    with_demos = [p for p in load_constitution(cfg.constitution.name).principles
                  if p.demonstrations.get("positive") and p.demonstrations.get("negative")]
    out = []
    for k in range(cfg.feedback.judge_shots if with_demos else 0):
        p = with_demos[k % len(with_demos)]
        i = k // len(with_demos)
        pos, neg = p.demonstrations["positive"], p.demonstrations["negative"]
        if i >= min(len(pos), len(neg)):
            break
        first, second, answer = (pos[i], neg[i], "A") if k % 2 == 0 else (neg[i], pos[i], "B")
        out.append({"prompt": pos[i]["prompt"], "response_a": first["response"], "response_b": second["response"],
                    "question": p.comparison, "answer": answer})
    return out


def shot_turns(template: str, demos: Sequence[dict]) -> list[dict]:
    """Worked comparisons as chat turns: the filled template, then the right letter."""
    turns = []
    for d in demos:
        turns += [{"role": "user", "content": template.format(prompt=d["prompt"], response_a=d["response_a"],
                                                              response_b=d["response_b"], question=d["question"])},
                  {"role": "assistant", "content": d["answer"]}]
    return turns


def openai_judge_name(ocfg) -> str:
    """Cache identity of an endpoint judge (one URL: the same name as before lists were allowed)."""
    return f"openai:{','.join(ocfg.base_urls)}:{ocfg.model}"


def judge_model_name(cfg) -> str:
    return cfg.model.feedback or models.base_name(cfg.model.policy)


def judge_name(cfg) -> str:
    """`model_name` of the judge make_judge builds (the label cache's identity), without building it."""
    return judge_model_name(cfg) if cfg.feedback.backend == "hf" else openai_judge_name(cfg.feedback.openai)


def make_judge(cfg) -> Judge:
    """The judge of this process selected by cfg.feedback.backend (hf model: cfg.model.feedback or the
    policy's base). A stage that spreads judging over Ray actors (`ray.workers`) builds
    `distributed_ray.RayJudge` instead, whose actors each hold the judge built here."""
    fb = cfg.feedback

    def hf() -> Judge:
        name = judge_model_name(cfg)
        model, tok = models.load_teacher(name, cfg.model)
        return HFJudge(model, tok, model_name=name, batch_size=fb.batch_size, cot_max_new_tokens=fb.cot_max_new_tokens,
                       demos=judge_demos(cfg))

    def openai() -> Judge:
        return OpenAIJudge(fb.openai, cot_max_new_tokens=fb.cot_max_new_tokens, demos=judge_demos(cfg))

    return {"hf": hf, "openai": openai}[fb.backend]()
