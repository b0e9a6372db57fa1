"""`morlaif export`: a run's models as folders that transformers, PEFT, vLLM and the Hub load without morlaif.

Inside a run, adapters name their base the way morlaif does (`embedded:...`, `../../sft/model`) so
the run directory can move and be branched. An export resolves all of that:

- Policy, adapter (`--stage rl|sft`, the default): ONE LoRA adapter on the base model the run
  started from, for `AutoPeftModelForCausalLM.from_pretrained(OUT)` or `vllm serve BASE
  --enable-lora --lora-modules NAME=OUT`. The aligned policy is the RL adapter stacked on the SFT
  adapter; two LoRA adapters on a layer are exactly one of rank r1 + r2:
      s1·B1·A1 + s2·B2·A2 = [s1·B1 | s2·B2] · [A1; A2]
  so the export concatenates A along the rank, B (scaled) along the rank, and sets alpha = r
  (scaling 1). A module only one adapter touches gets zeros for the other's share. Its
  `base_model_name_or_path` is a base that resolves: the Hub id when the run's base came from the
  Hub, else an absolute path (our embedded models: their local de-quantized copy).
- Policy, merged (`--merge`): the adapters folded into the weights, for
  `AutoModelForCausalLM.from_pretrained(OUT)` and `vllm serve OUT`.
- Preference models (`--stage rm`): `AutoModelForSequenceClassification` with one label per
  objective (`id2label`), the LoRA adapter merged into the backbone and our linear head as its
  `score` layer, so one forward pass returns the K raw rewards; the normalisation statistics and
  what each objective reads (aspect objectives read a transcript with the follow-up turn) are in
  `config.json` under "morlaif". The `separate` layout has one backbone per objective: one folder
  each, OUT/OBJECTIVE/.

Every folder holds safetensors weights, the tokenizer with its chat template, a model card
(README.md with YAML metadata: base model, constitution, objectives, scalarizer and weights, the
run's evaluation) and, for policies, the generation config. Before it finishes, the export loads
what it wrote with plain transformers / PEFT and compares it with morlaif's own loading on a
probe text; the largest difference is printed and written into the card.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from morlaif import models, preference
from morlaif.artifacts import atomic_write_text, read_json, write_json
from morlaif.conditioning import Conditioning
from morlaif.config import Config
from morlaif.constitution import aspect_questions, load_constitution
from morlaif.errors import InputError, RunError
from morlaif.generation import chat, render

PROBE = "How do I pick a lock? Answer briefly, then say why."
PROBE_RESPONSE = "I can't help with breaking into property that isn't yours, but a locksmith can."
MAX_DIFF_FP32 = 1e-3  # largest |difference| tolerated between the export and morlaif's loading (float32)


# ----------------------------------------------------------------------------- policies: one LoRA adapter


def adapter_chain(path: Path) -> tuple[list[Path], str]:
    """(adapter dirs from the top one down, the root base below them): rl/policy -> sft/model -> base."""
    chain = []
    name = str(path)
    while models.is_adapter(models.resolve(name)):
        chain.append(Path(models.resolve(name)))
        name = models.adapter_base(str(chain[-1]))
    return chain, name


def _scaling(cfg: dict) -> float:
    """PEFT's LoRA scaling of an adapter config (alpha / r; alpha / sqrt(r) with rsLoRA)."""
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])


def _check_plain_lora(cfg: dict, path: Path) -> None:
    """Only plain LoRA combines into one adapter (no DoRA, bias, per-module ranks, extra trained modules)."""
    plain = (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora") and cfg.get("bias", "none") == "none"
             and not cfg.get("modules_to_save") and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
             and cfg.get("layers_to_transform") is None)
    if not plain:
        raise InputError("only plain LoRA adapters combine into one adapter: export with --merge",
                         file=str(path / "adapter_config.json"))


def combine_adapters(chain: list[Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """One LoRA adapter (config, state dict) equal to the stacked adapters of `chain`: rank = the sum
    of their ranks, A concatenated along the rank, B scaled by each adapter's scaling and
    concatenated along the rank, alpha = rank (scaling 1)."""
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in chain]
    for c, p in zip(configs, chain):
        _check_plain_lora(c, p)
    tensors = [load_file(str(models.require_safetensors_adapter(p) / "adapter_model.safetensors")) for p in chain]
    modules = sorted({k.removesuffix(".lora_A.weight") for t in tensors for k in t if k.endswith(".lora_A.weight")})
    rank = sum(c["r"] for c in configs)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        a_parts, b_parts = [], []
        shape_in = next(t[f"{m}.lora_A.weight"].shape[1] for t in tensors if f"{m}.lora_A.weight" in t)
        shape_out = next(t[f"{m}.lora_B.weight"].shape[0] for t in tensors if f"{m}.lora_B.weight" in t)
        for c, t in zip(configs, tensors):
            if f"{m}.lora_A.weight" in t:
                a_parts.append(t[f"{m}.lora_A.weight"].float())  # (r_i, in)
                b_parts.append(t[f"{m}.lora_B.weight"].float() * _scaling(c))  # (out, r_i), scaled
            else:  # this adapter leaves the module alone: a zero share of the rank
                a_parts.append(torch.zeros(c["r"], shape_in))
                b_parts.append(torch.zeros(shape_out, c["r"]))
        out[f"{m}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()  # (r, in)
        out[f"{m}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()  # (out, r)
    cfg = {**configs[0], "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0,
           "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules})}
    return cfg, out


def resolvable_base(name: str) -> str:
    """What an exported adapter records as its base: a Hub id as it is; anything else (our embedded
    models, `tiny`, a local folder) as the absolute path of the weights it was trained on."""
    return name if models.hub_id(name) == name else str(Path(models.resolve(name)).resolve())


# ----------------------------------------------------------------------------- model cards


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def _run_summary(cfg: Config, run_dir: Path, rl_part: bool = True) -> str:
    """The card's account of the run: constitution, objectives, scalarizer and weights, evaluation
    (`rl_part` False, for the SFT policy: the constitution and objectives only)."""
    con = load_constitution(cfg.constitution.name)
    rl = cfg.rl
    objectives = [o for o in (read_json(run_dir / "rm" / "objectives.json")["objectives"]
                              if (run_dir / "rm" / "objectives.json").is_file() else [])]
    lines = [f"## Constitution: `{con.name}`", "", "| principle | description |", "|---|---|"]
    lines += [f"| {p.name} | {p.description} |" for p in con.principles]
    lines += ["", f"**Objectives** (one preference model each): {', '.join(f'`{o}`' for o in objectives) or 'n/a'}", ""]
    if not rl_part:
        return "\n".join(lines + ["This is the supervised (SL-CAI) policy, before policy optimisation.", ""])
    params = {"linear": "", "soft_max_min": f", tau={rl.tau}", "uncertainty_weighted": f", lambda={rl.variance_penalty}",
              "lower_quantile": f", q={rl.q:.3g}"}.get(rl.scalarizer, "")
    weights = rl.weights or "uniform"
    lines += [f"**Reward**: `{rl.scalarizer}`{params} over the objectives' rewards"
              f"{' (z-scored with the SFT policy statistics)' if rl.normalize else ''}, weights {weights}; "
              f"policy optimisation `{rl.algo}`, {rl.steps} steps.", ""]
    m = read_json(run_dir / "eval" / "metrics.json") if (run_dir / "eval" / "metrics.json").is_file() else None
    if m:
        rb, ra = m["reward"]["base"], m["reward"]["aligned"]
        f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        lines += ["## Evaluation of this run (held-out prompts)", "", "| metric | base | aligned |", "|---|---|---|",
                  f"| scalarized reward | {f(rb['scalarized'])} | {f(ra['scalarized'])} |"]
        lines += [f"| reward: {k} | {f(rb['per_objective'].get(k))} | {f(ra['per_objective'].get(k))} |"
                  for k in m["objectives"]]
        rr = m["refusal_rate"]
        lines += [f"| refusal rate, harmful prompts | {f(rr['harmful']['base'])} | {f(rr['harmful']['aligned'])} |",
                  f"| refusal rate, benign prompts | {f(rr['benign']['base'])} | {f(rr['benign']['aligned'])} |"]
        wr = m.get("win_rate") or {}
        if wr.get("aligned_vs_base") is not None:
            lo, hi = wr["ci95"]
            lines.append(f"| win rate aligned vs base (judge) | | {wr['aligned_vs_base']:.3f} [{lo:.3f}, {hi:.3f}] |")
        lines += [f"| KL to base (nats/response) | | {f(m.get('kl_to_base'))} |", ""]
        fb = run_dir / "feedback" / "metrics.json"
        cal = read_json(fb).get("calibration_agreement") if fb.is_file() else None
        if cal is not None:
            lines += [f"The AI judge agreed with a hand-labelled calibration set {cal:.0%} of the time; read the "
                      "numbers with that in mind.", ""]
    return "\n".join(lines)


def steering_section(cond: Conditioning) -> str:
    """The card's section on how to steer a weight-conditioned policy (`rl.conditioning: prompt`)."""
    line = cond.example()
    return ("## Steering: this policy reads its objective weights\n\n"
            "It was trained for every trade-off at once: each training episode drew weights over the objectives, "
            "showed them as a system message and rewarded the answer under them. Write the weights you want in the "
            f"same form, one line, these objectives in this order ({', '.join(cond.objectives)}), two decimals, "
            f"summing to 1; the weights it was configured (and evaluated) for are:\n\n    {line}\n\n"
            "```python\nmessages = [{\"role\": \"system\", \"content\": \"" + line + "\"},\n"
            "            {\"role\": \"user\", \"content\": \"How do I store bleach safely?\"}]\n"
            "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\n```\n\n"
            "Without such a line the policy sees a conversation unlike any it was trained on.\n\n")


def _card(meta: dict, title: str, body: str) -> str:
    head = "\n".join(f"{k}: {v}" for k, v in meta.items() if v is not None)
    return f"---\n{head}\n---\n\n# {title}\n\n{body.strip()}\n"


# ----------------------------------------------------------------------------- checks


def _probe_ids(tok) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok([render(tok, chat(PROBE))], return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()


def _check(diff: float, dtype: str, what: str) -> None:
    if dtype == "float32" and not diff <= MAX_DIFF_FP32:
        raise RunError(f"the exported {what} does not reproduce the run's (max |difference| {diff:.3g}); "
                       "please report this")


# ----------------------------------------------------------------------------- exports


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not empty: export into a new folder", file=str(out), key="--out")
    out.mkdir(parents=True, exist_ok=True)


def policy_dir(run_dir: Path, stage: str | None) -> Path:
    """The policy a stage left (rl/policy, sft/model); no stage: the aligned one when there is one."""
    where = {"rl": run_dir / "rl" / "policy", "sft": run_dir / "sft" / "model"}
    for name in ([stage] if stage else ["rl", "sft"]):
        if models.saved_model_files(where[name]):
            return where[name]
    raise InputError(f"no {stage or 'policy'} model in this run: run its stage first", file=str(run_dir))


def export_policy(cfg: Config, run_dir: Path, stage: str | None, out: Path, *, merge: bool, dtype: str,
                  base_model: str | None = None) -> dict:
    """Write the policy as one adapter on its base, or merged (`merge`, or a fully fine-tuned policy
    without adapters); return what was written and the check's max |logit difference|."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = policy_dir(run_dir, stage)
    chain, root = adapter_chain(src)
    merge = merge or not chain
    tok = models.load_tokenizer(str(src))
    ref = models.load_model(str(src), device="cpu", dtype="float32")
    ids, mask = _probe_ids(tok)
    want = _logits(ref, ids, mask)  # (1, T, V) morlaif's own loading
    _prepare_out(out)
    dt = models.pick_dtype(dtype, torch.device("cpu"))
    if merge:
        merged = ref.merge_and_unload() if hasattr(ref, "peft_config") else ref
        merged.to(dt).save_pretrained(out, safe_serialization=True)
        del ref, merged
        got = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids, mask)
        recorded = None
    else:
        del ref
        acfg, tensors = combine_adapters(chain)
        recorded = base_model or resolvable_base(root)
        acfg["base_model_name_or_path"] = recorded
        save_file({k: v.to(dt) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
        write_json(out / "adapter_config.json", acfg)
        from peft import AutoPeftModelForCausalLM

        got = _logits(AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), ids, mask)
    cond = Conditioning.load(src)  # a steerable policy: its weights line goes into the template's docs and the card
    if cond and isinstance(tok.chat_template, str):
        tok.chat_template = (f"{{#- morlaif: a weight-conditioned policy. Steer it with a system message of one line, "
                             f"'{cond.example()}' (these objectives, this order, two decimals, summing to 1) -#}}\n"
                             + tok.chat_template)
    tok.save_pretrained(out)  # with its chat template; left padding, as decoder-only generation wants
    if cond:
        cond.save(out)
    gen_src = Path(models.resolve(root)) if chain else src
    gen = (GenerationConfig.from_pretrained(gen_src) if (gen_src / "generation_config.json").is_file()
           else GenerationConfig(eos_token_id=tok.eos_token_id))
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)
    diff = float((got - want).abs().max())
    _check(diff, dtype, "policy")
    rl = src.name == "policy"  # rl/policy; else sft/model
    lineage = models.base_name(cfg.model.policy)  # the model the run started from
    hub = models.hub_id(lineage)
    if merge:
        kind = "merged model"
        usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"model = AutoModelForCausalLM.from_pretrained(\"{out.name}\")\n"
                 f"tok = AutoTokenizer.from_pretrained(\"{out.name}\")\n```\n\nServe it: `vllm serve {out.name}`")
    else:
        kind = f"one LoRA adapter (rank {acfg['r']}) on `{recorded}`"
        usage = ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
                 f"model = AutoPeftModelForCausalLM.from_pretrained(\"{out.name}\")\n"
                 f"tok = AutoTokenizer.from_pretrained(\"{out.name}\")\n```\n\n"
                 f"Serve it: `vllm serve {recorded} --enable-lora --max-lora-rank {acfg['r']} --lora-modules "
                 f"aligned={out.name}`")
    origin = ""
    if hub and hub != lineage:  # one of our embedded models: de-quantized from a GGUF file
        origin = (f"The run started from `{lineage}`: `{hub}` as de-quantized from a GGUF file, close to but not "
                  "bit-equal to the Hub weights. " + ("" if merge else f"This adapter names that local copy as its "
                  f"base; `morlaif export --base-model {hub}` records the Hub id instead (its logits then differ "
                  "slightly). ") + "\n\n")
    body = (f"A policy aligned with morlaif (multi-objective RL from AI feedback): {kind}, exported from "
            f"`{src.relative_to(run_dir)}` of run `{run_dir.name}`.\n\n{origin}{usage}\n\n"
            f"Loaded back with plain transformers/PEFT, its logits on a probe prompt differ from morlaif's own "
            f"loading by at most {diff:.2e} (weights in {dtype}).\n\n" + (steering_section(cond) if cond else "")
            + _run_summary(cfg, run_dir, rl_part=rl))
    meta = {"base_model": hub, "library_name": "transformers" if merge else "peft", "pipeline_tag": "text-generation",
            "tags": _yaml_list(["morlaif", "rlaif", "constitutional-ai", "multi-objective"]
                               + ([cfg.rl.algo] if rl else ["sft"]) + ([] if merge else ["lora"]))}
    atomic_write_text(out / "README.md", _card(meta, f"{run_dir.name}: {'aligned' if rl else 'SFT'} policy", body))
    return {"out": str(out), "kind": "merged" if merge else "adapter", "base": recorded, "max_abs_logit_diff": diff}


def _sequence_classifier(body, head: torch.Tensor, objectives: list[str], extra: dict, pad_token_id: int, dt):
    """AutoModelForSequenceClassification with `body`'s weights and `head` (K, H) as its score layer."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(body.config)
    config.num_labels = len(objectives)
    config.id2label = dict(enumerate(objectives))
    config.label2id = {o: i for i, o in enumerate(objectives)}
    config.problem_type = "regression"
    config.pad_token_id = pad_token_id
    config.architectures = None
    config.morlaif = extra
    config.use_cache = False
    seq = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    score = getattr(seq, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None or score.weight.shape != head.shape:
        raise InputError(f"{type(seq).__name__} has no bias-free `score` layer to take the reward head (exports "
                         "support decoder models such as Llama, Qwen2, Mistral, GPT-2)", key="rm.backbone")
    seq.base_model.load_state_dict(body.state_dict())
    with torch.no_grad():
        score.weight.copy_(head)
    return seq.to(dt).eval()


def _pad_token_for_pooling(tok, texts: list[str]) -> int:
    """A pad id that never ends a transcript. HF's sequence classifiers pool the last token that is not
    `pad_token_id`; our scorer the last real one by attention mask. They agree while no text ends with
    the pad token (SmolLM2 pads with its EOS, which ends every turn but is followed by a newline)."""
    last = {tok(t, add_special_tokens=False)["input_ids"][-1] for t in texts}
    if tok.pad_token_id not in last:
        return tok.pad_token_id
    for t in (tok.unk_token, tok.bos_token, tok.eos_token):
        if t is not None and tok.convert_tokens_to_ids(t) not in last:
            tok.pad_token = t
            return tok.pad_token_id
    raise RunError("no pad token that leaves the end of a transcript alone: cannot export the preference models")


def export_rm(cfg: Config, run_dir: Path, out: Path, *, dtype: str) -> dict:
    """Write the preference models as AutoModelForSequenceClassification folders (see the module doc)."""
    from transformers import AutoModelForSequenceClassification

    rm = run_dir / "rm"
    if not (rm / "objectives.json").is_file():
        raise InputError("no preference models here: run `morlaif rm --run DIR` first", file=str(rm / "objectives.json"))
    meta, norm = read_json(rm / "objectives.json"), read_json(rm / "norm.json")
    objectives = meta["objectives"]
    if meta["layout"] == "multihead":
        groups = [(preference.MULTIHEAD_ADAPTER, objectives, out)]
    else:
        groups = [(meta["adapters"][o], [o], out / o.replace(":", "-")) for o in objectives]
    tok = preference.load_scoring_tokenizer(str(rm / "model"), cfg.model.trust_remote_code)
    questions = aspect_questions()
    # what each objective reads: its transcript (aspect objectives: with the follow-up turn) -> probe texts
    followup = {o: questions[a] for o in objectives if (a := preference.aspect(o))}
    probes = {o: preference.objective_text(tok, PROBE, PROBE_RESPONSE, (followup[o], "To keep you safe.")
                                           if o in followup else None) for o in objectives}
    pad = _pad_token_for_pooling(tok, list(probes.values()))
    _prepare_out(out)
    dt = models.pick_dtype(dtype, torch.device("cpu"))
    diffs = {}
    for adapter, objs, dest in groups:
        # loaded as every stage that scores loads it (RewardScorer.load), on the CPU in float32
        model, heads = preference.load_trained(rm, [adapter], torch.device("cpu"), torch.float32,
                                               cfg.model.trust_remote_code)
        lin = heads[adapter].float()
        head = lin.weight.detach().clone()  # (K, H)
        texts = [probes[o] for o in objs]
        ids, mask = preference.encode(tok, texts, meta["max_length"], torch.device("cpu"))
        with torch.no_grad():
            want = preference.rewards(model, lin, ids, mask)  # (n, K) as RewardScorer computes them
        extra = {
            "objectives": objs,
            "normalization": {"mean": [norm["mean"][o] for o in objs], "std": [norm["std"][o] for o in objs],
                              "min_std": 1e-3, "note": "z = (score - mean) / max(std, min_std), per objective"},
            "followup_questions": {o: followup[o] for o in objs if o in followup},
            "max_length": meta["max_length"],
            "input": "the chat transcript (tokenizer.apply_chat_template(messages, tokenize=False), then "
                     "tokenizer(text, add_special_tokens=False)): user prompt, assistant response; an objective "
                     "listed in followup_questions reads two more turns: that question, the policy's answer",
        }
        seq = _sequence_classifier(model.merge_and_unload(), head, objs, extra, pad, dt)
        dest.mkdir(parents=True, exist_ok=True)
        seq.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
        del seq, model
        loaded = AutoModelForSequenceClassification.from_pretrained(dest, dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits  # (n, K)
        diff = float((got - want).abs().max())
        _check(diff, dtype, "preference model")
        diffs[dest.name if dest != out else "all"] = diff
        hub = models.hub_id(models.base_name(meta["backbone"]))
        body = (f"Preference (reward) model{'s' if len(objs) > 1 else ''} of a morlaif run: one score per objective, "
                f"`AutoModelForSequenceClassification` with `id2label` = {json.dumps(dict(enumerate(objs)))}, "
                "trained with a soft Bradley-Terry loss on AI labels, so a score difference is a log-odds of "
                "preference.\n\n"
                "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                f"rm = AutoModelForSequenceClassification.from_pretrained(\"{dest.name}\")\n"
                f"tok = AutoTokenizer.from_pretrained(\"{dest.name}\")\n"
                "text = tok.apply_chat_template([{\"role\": \"user\", \"content\": prompt},\n"
                "                                {\"role\": \"assistant\", \"content\": response}], tokenize=False)\n"
                "scores = rm(**tok([text], return_tensors=\"pt\", add_special_tokens=False)).logits  # (1, K) raw\n"
                "```\n\n"
                "z-score each column with `rm.config.morlaif[\"normalization\"]` before combining them, as the run did. "
                + ("Objectives in `rm.config.morlaif[\"followup_questions\"]` read the transcript with two more turns "
                   "(that question, then the policy's answer); take their column from that text. " if followup else "")
                + f"Texts longer than {meta['max_length']} tokens were cut from the left in training.\n\n"
                "TRL's `reward_funcs` takes a model's first label only: for several objectives pass a function "
                "that scores with this model and combines the columns (morlaif's scalarizers: "
                "`morlaif.scalarize.scalarize`).\n\n"
                f"Loaded back with plain transformers, its scores differ from morlaif's scorer by at most {diff:.2e}."
                "\n\n" + _run_summary(cfg, run_dir))
        meta_card = {"base_model": hub, "library_name": "transformers", "pipeline_tag": "text-classification",
                     "tags": _yaml_list(["morlaif", "reward-model", "multi-objective", "rlaif"])}
        atomic_write_text(dest / "README.md", _card(meta_card, f"{run_dir.name}: preference models", body))
    if meta["layout"] != "multihead":
        atomic_write_text(out / "README.md", "# Preference models, one folder per objective\n\n" + "\n".join(
            f"- `{g[2].name}/`: {g[1][0]}" for g in groups) + "\n")
    return {"out": str(out), "kind": "sequence-classification", "layout": meta["layout"],
            "max_abs_score_diff": diffs}


def export(cfg: Config, run_dir: Path, stage: str | None, out: Path, *, merge: bool = False, dtype: str = "float32",
           base_model: str | None = None) -> dict:
    """`morlaif export`: prints and returns what was written and the check's largest difference. A failure
    leaves no half-written folder behind."""
    if not run_dir.is_dir():
        raise InputError("run directory not found", file=str(run_dir))
    if stage == "rm" and (merge or base_model):
        raise InputError("--merge and --base-model are for policies: preference models are always whole models",
                         key="--stage")
    fresh = not out.exists()
    try:
        if stage == "rm":
            res = export_rm(cfg, run_dir, out, dtype=dtype)
        else:
            res = export_policy(cfg, run_dir, stage, out, merge=merge, dtype=dtype, base_model=base_model)
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(json.dumps(res, indent=2))
    return res
