"""Small transformers models built from config (random weights, no downloads)."""

from __future__ import annotations

import torch


def tiny_qwen3(seed: int = 0, layers: int = 2, **config):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **config,
    )
    return Qwen3ForCausalLM(cfg).eval()


def token_batch(vocab: int = 128, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
