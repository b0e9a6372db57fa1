"""`morlaif` command line. Every command takes --config FILE and --set key=value (default < YAML < CLI).

Bad input (unknown key, wrong type, malformed line, missing file) exits 2 with one line; a stage
that cannot finish on good input (the judge endpoint keeps failing, training diverges) exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from morlaif.artifacts import read_jsonl
from morlaif.config import accelerate_config_path, field_help, load_config, recipe_yaml
from morlaif.constitution import configured_objectives
from morlaif.errors import InputError, RunError
from morlaif.pipeline import check_stages, force_stage, run_all, stage_module, write_run_config
from morlaif.processes import is_main_process, process_state
from morlaif.training import check_settings

# Below, imports inside functions load the stage modules (torch, transformers) only for the
# command that needs them: `morlaif --help` and `morlaif config` stay light.


def _common(p: argparse.ArgumentParser, run_required: bool = False) -> None:
    p.add_argument("--config", help="YAML recipe: a file, or a recipe shipped with morlaif by name (default, thorough, tiny). "
                   "On an existing run it is laid over the run's config.yaml; with neither, the embedded default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rl.steps=20 or --set rl.learning_rate=1e-5 (repeatable)")
    if run_required is not None:
        p.add_argument("--run", required=run_required, help="run directory")


def _stage(sub, name: str, help_: str, run_required: bool = True, func=None) -> argparse.ArgumentParser:
    """A stage command's parser; its handler is `func` (default: run the stage on --run)."""
    p = sub.add_parser(name, help=help_)
    p.set_defaults(func=func or _stage_command)
    _common(p, run_required=run_required)
    p.add_argument("--force", action="store_true",
                   help="redo the stage even if it is finished or was made with other settings (the old directory "
                   "moves to RUN/.replaced/, nothing is deleted)")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="morlaif", description="Multi-objective RL from AI feedback.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="the whole pipeline (embedded default with no --config)")
    p.set_defaults(func=_run_command)
    _common(p, run_required=None)
    p.add_argument("--out", default="runs/default",
                   help="run directory; an existing run keeps its config.yaml (--config and --set apply on top)")
    p.add_argument("--from", dest="from_run", metavar="RUN",
                   help="branch: start from RUN's config and link RUN's finished stages that the --config/--set "
                   "changes leave alone into --out, running the rest")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE and every later stage even if finished or made with other settings ('all': every "
                   "stage); old directories move to RUN/.replaced/, nothing is deleted")

    _stage(sub, "prompts", "train/eval prompt splits")
    _stage(sub, "sft", "SL-CAI critique/revision data + SFT (LoRA or full)")

    p = _stage(sub, "feedback", "response pairs + AI labels (or label any pairs file)", run_required=False,
               func=_feedback_command)
    p.add_argument("--pairs", help="pairs JSONL (prompt, response_a, response_b) to label instead of the run's")
    p.add_argument("--out", help="output JSONL for --pairs; output JSON for --calibrate")
    p.add_argument("--objectives", help="comma-separated objectives (default: the constitution's)")
    p.add_argument("--strategy", choices=["judge", "contrastive"], help="labelling strategy")
    p.add_argument("--calibrate", metavar="SET", help="measure the judge on labelled pairs (prompt, response_a, "
                   "response_b, preferred, optional objective): a JSONL file, or a packaged set "
                   "('calibration', 'hh-harmless-dev')")
    p.add_argument("--limit", type=int, help="with --calibrate: judge a seeded sample of this many pairs")

    p = _stage(sub, "rm", "preference models (or, with --human, their agreement with human labels)", func=_rm_command)
    p.add_argument("--human", metavar="SET", help="labelled pairs (prompt, response_a, response_b, preferred a|b, "
                   "optional objective): a JSONL file or a packaged set ('hh-harmless-dev', 'calibration'); prints the "
                   "agreement of the run's preference models with these labels, and linear weights fitted to them")
    p.add_argument("--limit", type=int, help="with --human: a seeded sample of this many pairs")
    p.add_argument("--out", help="with --human: output JSON (default RUN/human/SET-STEM.json)")

    p = _stage(sub, "rl", "policy optimisation", func=_rl_command)
    p.add_argument("--algo", choices=["ppo", "grpo", "rloo", "raft", "dpo", "ipo", "kto"],
                   help="sets rl.algo; on a run whose rl/ holds another algorithm's policy this is refused (--force "
                   "replaces it; `morlaif run --from RUN --out NEW --set rl.algo=...` keeps both)")

    p = _stage(sub, "eval", "evaluation, base vs aligned", func=_eval_command)
    p.add_argument("--prompts", help="prompts to evaluate on instead of the eval split: a JSONL file (prompt, optional "
                   "kind), a local dataset folder or a Hugging Face dataset id, with options after '?' (split, field, "
                   "name, data_dir, kind, limit), e.g. 'Anthropic/hh-rlhf?data_dir=harmless-base&split=test&limit=100'")
    p.add_argument("--out", help="output metrics JSON with --prompts")

    _stage(sub, "report", "HTML report")

    p = sub.add_parser("export", help="a folder plain transformers / PEFT / vLLM load (a policy, or the preference "
                       "models as AutoModelForSequenceClassification with one label per objective)")
    p.set_defaults(func=_export_command)
    _common(p, run_required=True)
    p.add_argument("--stage", choices=["rl", "sft", "rm"], help="what to export (default: rl when the run has an "
                   "aligned policy, else sft)")
    p.add_argument("--merge", action="store_true", help="a policy with its adapters merged into the weights "
                   "(AutoModelForCausalLM); default: one LoRA adapter on the base model (AutoPeftModelForCausalLM)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the exported weights")
    p.add_argument("--base-model", help="the base an adapter export records (default: the Hub id or absolute path "
                   "of the weights it was trained on)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")

    p = sub.add_parser("compare", help="one policy per scalarizer (and the single-objective baseline) from the run's "
                       "preference models, evaluated side by side")
    p.set_defaults(func=_compare_command)
    _common(p, run_required=True)
    p.add_argument("--scalarizers", help="comma-separated scalarizers, one arm each (default: all seven)")
    p.add_argument("--baseline", action="store_true", help="also the single-objective arm on the holistic preference "
                   "model, and every arm's win rate against it")
    p.add_argument("--out", help="output directory (default RUN/compare)")

    p = sub.add_parser("steer", help="best-of-N steering curve: one objective's weight from 0 to 1")
    p.set_defaults(func=_steer_command)
    _common(p, run_required=True)
    p.add_argument("--objective", required=True, help="the objective whose weight is swept")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (best of N; default 8)")
    p.add_argument("--points", type=int, default=6, help="weights from 0 to 1 (default 6)")
    p.add_argument("--scalarizer", help="scalarizer that reranks (default: the run's; one that uses weights)")
    p.add_argument("--model", help="policy to sample (default: the run's aligned policy)")
    p.add_argument("--limit", type=int, help="the first N held-out prompts (default: all)")
    p.add_argument("--conditioned", action="store_true", help="the curve of one weight-conditioned policy "
                   "(rl.conditioning: prompt) asked at each weight, instead of best-of-N reranking (default: off)")
    p.add_argument("--out", help="output directory (default RUN/steer)")

    p = sub.add_parser("generate", help="sample from a model")
    p.set_defaults(func=_generate_command)
    _common(p)
    p.add_argument("--model", help="model name, path or adapter dir (default: the config's policy)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="JSONL with a 'prompt' per line")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--best-of", type=int, help="sample N and rerank by the run's preference models")
    p.add_argument("--weights", help="objective weights, e.g. honesty=2,prudence=1: with --best-of, how candidates are "
                   "reranked (default: rl.weights); without, what a weight-conditioned policy (rl.conditioning: prompt; "
                   "--model, or the --run's aligned policy) is asked to answer for")
    p.add_argument("--scalarizer", help="scalarizer for --best-of (default: the config's)")

    p = sub.add_parser("score", help="per-objective and scalarized reward of one response (an aspect objective: "
                       "the run's aligned policy answers its follow-up question, printed)")
    p.set_defaults(func=_score_command)
    _common(p, run_required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True)

    p = sub.add_parser("bench", help="performance figures against baselines, in one run")
    p.set_defaults(func=_bench_command)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small workloads (CPU: a few minutes)")
    p.add_argument("--out", required=True, help="output JSON")

    p = sub.add_parser("serve-judge", help="serve a judge model through llama.cpp's OpenAI-compatible server, for "
                       "feedback.backend: openai (needs the server extra: pip install 'morlaif[server]')")
    p.set_defaults(func=_serve_judge_command)
    p.add_argument("--model", default="embedded:qwen2.5-coder-1.5b-instruct",
                   help="an embedded model (its GGUF) or a .gguf file (default: the embedded teacher)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")

    p = sub.add_parser("config", help="print the resolved config (or every key with its help)")
    p.set_defaults(func=_config_command)
    _common(p)
    p.add_argument("--keys", action="store_true", help="list every key, default and help text")
    p.add_argument("--recipe", action="store_true", help="print the resolved config as a commented YAML recipe")
    p.add_argument("--accelerate", metavar="NAME", help="print the path of an accelerate config shipped with morlaif "
                   "(ddp, fsdp, deepspeed_zero2, deepspeed_zero3): accelerate launch --config_file "
                   "\"$(morlaif config --accelerate ddp)\" -m morlaif.cli ...")
    return ap


def run_config(args) -> Path | None:
    """The config.yaml an existing run already has, which --config and --set are laid over: the --out run's
    for `run` (a new branch: its --from run's), else the --run run's."""
    if args.cmd == "run":
        for d in (args.out, args.from_run):
            if d and Path(d, "config.yaml").is_file():
                return Path(d, "config.yaml")
        if args.from_run:
            raise InputError("not a run directory (no config.yaml)", file=args.from_run, key="--from")
        return None
    run = getattr(args, "run", None)
    return Path(run, "config.yaml") if run and Path(run, "config.yaml").is_file() else None


def resolve_config(args):
    return load_config(args.config, args.overrides, base=run_config(args))


def check_config(cfg) -> None:
    """What the typed config cannot check alone, before any stage writes a file: the constitution loads,
    the objectives are in it, rl.weights names only those objectives, 4-bit loading can apply, and
    sft.trl_args / rl.trl_args name arguments TRL has."""
    from morlaif.scalarize import Scalarizer

    Scalarizer.from_config(cfg.rl, [o.name for o in configured_objectives(cfg.constitution)])
    check_settings(cfg)


def _seed(cfg) -> None:
    from transformers import set_seed

    set_seed(cfg.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args) or 0  # the command's handler (build_parser: set_defaults(func=...))
    except InputError as e:
        print(f"morlaif: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"morlaif: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("morlaif: interrupted (stages resume from what they wrote)", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- one handler per command
# Each takes the parsed arguments and returns the exit status (None: 0).


def _configured(args, one_file: bool = False):
    """The command's config, checked, with the process group joined and the seed set. None on a process
    other than the main one when `one_file` (launched on several processes, a command that is not a stage
    runs once, on the main one)."""
    cfg = resolve_config(args)
    check_config(cfg)
    process_state(cfg.model.device)  # under accelerate launch / torchrun: join the process group on the run's device
    if one_file and not is_main_process():
        return None
    _seed(cfg)
    return cfg


def _run_dir(args) -> Path:
    """--run of a command that measures a finished run; InputError when it is not a directory."""
    if not Path(args.run).is_dir():
        raise InputError("run directory not found", file=str(args.run))
    return Path(args.run)


def _stage_command(args, cfg=None) -> int:
    """A pipeline stage on --run: prompts, sft, feedback, rm, rl, eval, report."""
    cfg = _configured(args) if cfg is None else cfg
    cmd = args.cmd
    run_dir = _run_dir(args)
    # Refused before config.yaml is rewritten: a refused command leaves the run exactly as it was.
    check_stages(cfg, run_dir, [cmd], {cmd} if args.force else set(), "--force")
    if args.force:
        force_stage(run_dir, cmd, print)
    write_run_config(cfg, run_dir)
    stage_module(cmd).run(cfg, run_dir)
    return 0


def _bench_command(args) -> int:
    import torch

    from morlaif import bench

    # its own workloads and models: the pipeline config does not apply
    bench.run(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.quick, args.out)
    return 0


def _serve_judge_command(args) -> int:
    from morlaif import serve

    serve.serve(args.model, host=args.host, port=args.port, n_ctx=args.n_ctx, threads=args.threads)  # execs
    return 0


def _config_command(args) -> int:
    if args.accelerate:
        print(accelerate_config_path(args.accelerate))
        return 0
    cfg = resolve_config(args)
    if args.keys:
        for key, default, help_ in field_help():
            print(f"{key:34s} {default:24s} {help_}")
    elif args.recipe:
        print(recipe_yaml(cfg), end="")
    else:
        print(cfg.to_yaml(), end="")
    return 0


def _run_command(args) -> int:
    cfg = _configured(args)
    return run_all(cfg, Path(args.out), force=set(args.force), source=Path(args.from_run) if args.from_run else None)


def _export_command(args) -> int:
    from morlaif import export

    cfg = _configured(args)
    export.export(cfg, Path(args.run), args.stage, Path(args.out), merge=args.merge, dtype=args.dtype,
                  base_model=args.base_model)
    return 0


def _generate_command(args) -> int:
    cfg = _configured(args, one_file=True)
    return 0 if cfg is None else _generate(cfg, args)


def _score_command(args) -> int:
    cfg = _configured(args, one_file=True)
    if cfg is None:
        return 0
    from morlaif import bestof

    bestof.print_score(bestof.score(cfg, Path(args.run), args.prompt, args.response))
    return 0


def _feedback_command(args) -> int:
    cfg = _configured(args, one_file=bool(args.pairs or args.calibrate))
    if cfg is None:
        return 0
    if args.calibrate:
        from morlaif import feedback

        feedback.calibrate_file(cfg, args.calibrate, limit=args.limit, out=args.out)
        return 0
    if args.pairs:
        from morlaif import feedback

        if not args.out:
            raise InputError("--pairs needs --out", key="--out")
        objectives = args.objectives.split(",") if args.objectives else None
        feedback.label_file(cfg, args.pairs, args.out, objectives=objectives, strategy=args.strategy)
        return 0  # label_file returns the row count, not an exit status
    if not args.run:
        raise InputError("feedback needs --run DIR, or --pairs IN.jsonl --out OUT.jsonl", key="--run")
    return _stage_command(args, cfg)


def _rm_command(args) -> int:
    cfg = _configured(args, one_file=bool(args.human))
    if cfg is None:
        return 0
    if not args.human:
        if args.limit is not None or args.out:
            raise InputError("--limit and --out go with --human SET", key="--human")
        return _stage_command(args, cfg)
    from morlaif import human

    run_dir = _run_dir(args)
    human.print_human(human.check_human_file(cfg, run_dir, args.human, limit=args.limit, out=args.out))
    return 0


def _rl_command(args) -> int:
    cfg = _configured(args)
    if args.algo:
        cfg.rl.algo = args.algo
    return _stage_command(args, cfg)


def _eval_command(args) -> int:
    cfg = _configured(args, one_file=bool(args.prompts))
    if cfg is None:
        return 0
    if not args.prompts:
        return _stage_command(args, cfg)
    from morlaif import evaluate

    if not args.out:
        raise InputError("--prompts needs --out", key="--out")
    evaluate.evaluate_file(cfg, Path(args.run), args.prompts, args.out)
    return 0


def _compare_command(args) -> int:
    """Measures a finished run: one arm per scalarizer."""
    cfg = _configured(args)
    run_dir = _run_dir(args)
    from morlaif import compare

    res = compare.compare(cfg, run_dir, compare.parse_scalarizers(args.scalarizers), args.baseline,
                          Path(args.out) if args.out else None)
    if res:  # the main process
        compare.print_table(res)
    return 0


def _steer_command(args) -> int:
    """Measures a finished run: one objective's best-of-N steering curve."""
    cfg = _configured(args, one_file=True)
    if cfg is None:
        return 0
    run_dir = _run_dir(args)
    from morlaif import steer

    steer.print_curve(steer.steer(cfg, run_dir, args.objective, n=args.n, points=args.points,
                                  scalarizer=args.scalarizer, model=args.model, limit=args.limit,
                                  out_dir=Path(args.out) if args.out else None, conditioned=args.conditioned))
    return 0


def _generate(cfg, args) -> int:
    from morlaif import models
    from morlaif.generation import Sampling, chat, generate

    if args.prompt:
        prompts = [args.prompt]
    else:
        prompts = [r["prompt"] for r in read_jsonl(args.prompts, required=("prompt",), strings=("prompt",))]
    if not prompts or not all(p.strip() for p in prompts):
        raise InputError("empty prompt", key="--prompt")
    given = {}  # --max-new-tokens and --temperature over the config's
    if args.max_new_tokens:
        given["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        given["temperature"] = args.temperature
    seed = cfg.seed if args.seed is None else args.seed
    name = args.model or cfg.model.policy
    if args.best_of:
        from morlaif import bestof

        sampling = Sampling.from_config(cfg, "candidates").replace(**given)
        sampling = sampling.replace(temperature=sampling.temperature or 1.0)  # greedy: N copies of one response
        for p in prompts:
            res = bestof.best_of_n(cfg, Path(args.run) if args.run else None, name, p, n=args.best_of,
                                   weights=args.weights, scalarizer=args.scalarizer, sampling=sampling, seed=seed)
            print(json.dumps(res, indent=2) if len(prompts) > 1 else res["best"])
        return 0
    convs = [chat(p) for p in prompts]
    if args.weights:  # without --best-of: a weight-conditioned policy answers for the weights itself
        from morlaif.bestof import parse_weights
        from morlaif.conditioning import Conditioning
        from morlaif.policy import aligned_path

        name = args.model or (str(aligned_path(Path(args.run))) if args.run else name)
        cond = Conditioning.load(Path(name)) if Path(name).is_dir() else None
        if cond is None:
            raise InputError(f"--weights without --best-of needs a weight-conditioned policy (trained with "
                             f"rl.conditioning: prompt); {name} is not one: rerank with --best-of N instead",
                             key="--weights")
        w = parse_weights(args.weights, cond.objectives)  # (K,)
        convs = [cond.messages(p, w) for p in prompts]
    model, tok = models.load(name, cfg.model)
    sampling = Sampling.from_config(cfg, "generate").replace(**given)
    outs = generate(model, tok, convs, **sampling.kwargs(), seed=seed)
    if len(prompts) == 1:
        print(outs[0])
    else:
        for p, o in zip(prompts, outs):
            print(json.dumps({"prompt": p, "response": o}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
