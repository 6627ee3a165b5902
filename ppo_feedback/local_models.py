"""Build GPT-2 models and a byte-level BPE tokenizer locally, with no model hub.

Tests use the tiny model (2 layers, 64 wide, seconds to build); benchmarks use the GPT-2-shaped one
(GPT-2 small's exact shape with random weights, so it costs what real GPT-2 costs).
Usage: python -m ppo_feedback.local_models OUT_DIR [tiny|gpt2-shaped]
"""
from __future__ import annotations

import sys
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "I love this pizza place, the crust is crisp and the sauce is fresh.",
    "The weather today is sunny and warm, a great day for a walk in the park.",
    "Machine learning models learn patterns from data and make predictions.",
    "Once upon a time there was a little robot who wanted to write poems.",
    "What a wonderful, happy and lovely morning! Thank you, this is great.",
    "This is terrible, sad and awful. I hate the rain and the cold wind.",
] * 40

SHAPES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=256),
    "gpt2-shaped": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
EOS = "<|endoftext|>"


def build_gpt2(out_dir: str | Path, shape: str = "tiny", seed: int = 0, train_steps: int | None = None) -> Path:
    """Write a GPT-2 of the named shape and its tokenizer to out_dir; return the path.

    The tiny model is briefly trained on the built-in corpus (`train_steps`, default 40 for tiny,
    0 otherwise) so that it has a peaked, corpus-like next-token distribution, as a real model has;
    a uniform random model gives PPO nothing to work with.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    dims = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=min(dims["vocab_size"], 2000), min_frequency=1,
                            special_tokens=[EOS], show_progress=False)
    bpe.save(str(out / "tokenizer.json"))
    tok = GPT2TokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tok.save_pretrained(out)
    config = GPT2Config(**dims, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    steps = (40 if shape == "tiny" else 0) if train_steps is None else train_steps
    if steps:
        _fit_corpus(model, tok, steps)
    model.save_pretrained(out)
    return out


def _fit_corpus(model, tokenizer, steps: int, batch_size: int = 16, lr: float = 3e-3) -> None:
    """Train `model` for a few language-modelling steps on CORPUS (seconds for the tiny shape)."""
    import torch

    ids = torch.tensor(tokenizer(" ".join(dict.fromkeys(CORPUS)) * 4)["input_ids"])
    block = 48
    windows = ids[: len(ids) // block * block].view(-1, block)  # (N, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "models/gpt2-tiny"
    print(build_gpt2(target, sys.argv[2] if len(sys.argv) > 2 else "tiny"))
