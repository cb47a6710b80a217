"""Tiny transformers models of several architectures, built from config (random weights).

Each entry: a builder ``seed -> model`` (eval mode), the module-path regexes of the
attention query/value projections (targeting by name), how many modules those select,
and a batch builder. Widths are 32, two blocks, a 128-token vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .models import tiny_qwen3, token_batch

_DECODER = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[int], torch.nn.Module]
    qv_names: tuple[str, ...]
    qv_count: int
    seq2seq: bool = False

    def batch(self, seed: int = 1) -> dict[str, torch.Tensor]:
        batch = token_batch(128, seed=seed)
        if self.seq2seq:
            batch["labels"] = token_batch(128, seq=6, seed=seed + 100)["input_ids"]
        else:
            batch["labels"] = batch["input_ids"]
        return batch


def _seeded(make: Callable[[], torch.nn.Module]) -> Callable[[int], torch.nn.Module]:
    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return make().eval()

    return build


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_DECODER))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_DECODER, head_dim=8))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_DECODER, head_dim=8))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    ))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
    ))


ARCHS = {
    a.name: a
    for a in [
        Arch("qwen3", tiny_qwen3, (r"\.q_proj$", r"\.v_proj$"), 4),
        Arch("llama", _seeded(_llama), (r"\.q_proj$", r"\.v_proj$"), 4),
        Arch("mistral", _seeded(_mistral), (r"\.q_proj$", r"\.v_proj$"), 4),
        Arch("gemma", _seeded(_gemma), (r"\.q_proj$", r"\.v_proj$"), 4),
        Arch("phi3", _seeded(_phi3), (r"\.qkv_proj$",), 2),
        Arch("bert", _seeded(_bert), (r"\.query$", r"\.value$"), 4),
        # encoder self-attention, decoder self- and cross-attention: 2 blocks x 3 x {q, v}
        Arch("t5", _seeded(_t5), (r"\.q$", r"\.v$"), 12, seq2seq=True),
    ]
}
