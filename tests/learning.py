"""A policy and a reward with a known optimum, for the tests that a learner learns (test_ppo, test_trl_algos).

The policy: a random 2-layer Llama with the SmolLM2 tokenizer whose (tied) embeddings carry a ±2 component
along a random unit direction u: +u for a fixed half S of the vocabulary, -u for the rest. The logit gap
between S and the rest is then set by how far the last hidden state points along u, which a LoRA adapter
can learn in a few steps. (The cached tiny model has logits all ~0 and no structure: no reward over tokens
could be learnt from it in a test-sized run.)

The reward: the share of a response's tokens in S. Its optimum is all of S, so a learner that follows the
reward moves probability onto S; `mass_on_s` measures that exactly (no sampling): the probability the
policy puts on S for the first response token, averaged over prompts.
"""

from pathlib import Path

import torch

from morlaif import models
from morlaif.generation import chat, render

PROMPTS = ["Tell me a story.", "What is the capital of France?", "How do I bake bread?", "Say something nice.",
           "Explain gravity.", "Write a haiku.", "Give me advice.", "What is two plus two?"]


def half_vocab_model(out: Path) -> tuple[str, object, torch.Tensor]:
    """Save the policy described above to `out`; returns (its dir, tokenizer, in_S mask (V,))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = models.load_tokenizer(models.TINY)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)  # (H,)
    in_s = torch.rand(len(tok), generator=g) < 0.5  # (V,)
    with torch.no_grad():
        model.get_input_embeddings().weight += 2.0 * torch.where(in_s, 1.0, -1.0)[:, None] * u[None, :]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), tok, in_s


class HalfVocabScorer:
    """Fake preference models with a known reward: 'share' = the fraction of response tokens
    (re-tokenized) in S; 'nonempty' = 1 for a non-empty response."""

    objectives = ["share", "nonempty"]

    def __init__(self, tok, in_s: torch.Tensor):
        self.tok, self.in_s = tok, in_s

    def score(self, prompts, responses, followups=None):
        rows = []
        for text in responses:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            rows.append([sum(bool(self.in_s[i]) for i in ids) / max(len(ids), 1), float(bool(text))])
        return torch.tensor(rows)  # (B, K)

    def normalize(self, r):
        return r


@torch.no_grad()
def mass_on_s(model_dir: str, tok, in_s: torch.Tensor, prompts: list[str] = PROMPTS) -> float:
    """Mean over prompts of P(first response token in S) under the policy saved at model_dir."""
    model = models.load_model(model_dir, device="cpu").eval()
    mass = []
    for p in prompts:
        ids = tok(render(tok, chat(p)), return_tensors="pt", add_special_tokens=False)["input_ids"]  # as rollouts
        probs = model(ids).logits[0, -1].float().softmax(-1)  # (V,)
        mass.append(probs[in_s].sum().item())
    return sum(mass) / len(mass)


def word_texts(tok, in_s: torch.Tensor, n: int = 3) -> tuple[str, str]:
    """(a text of n word tokens all in S, one of n word tokens none in S), each re-tokenizing to itself: the
    chosen and rejected responses of preference pairs whose optimum is known."""
    words = [i for i in range(1000, len(tok)) if tok.convert_ids_to_tokens(i).startswith("Ġ")
             and tok.convert_ids_to_tokens(i)[1:].isalpha()]
    texts = []
    for side in (True, False):
        ids = [i for i in words if bool(in_s[i]) == side][:n]
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
        texts.append(tok.decode(ids))
    return texts[0], texts[1]
