"""Small transformers models built from config (random weights, no downloads)."""

from __future__ import annotations

import torch


def tiny_qwen3(seed: int = 0, layers: int = 2, **config):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, max_position_embeddings=64)
    cfg = Qwen3Config(num_hidden_layers=layers, **{**shape, **config})
    return Qwen3ForCausalLM(cfg).eval()


# bitsandbytes' CPU 4-bit kernels (0.50, AVX512-BF16 machines) quantize rows shorter than
# one 64-value block with ~4x the usual error and cannot repack them for inference: bnb
# test models use the tiny Qwen3 shape widened so every in_features >= 64 and every
# out_features is a multiple of 32, as in any real model
BNB_WIDE = dict(hidden_size=64, intermediate_size=128, head_dim=16)


def bnb_qwen3(setting: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """The widened tiny Qwen3 (:data:`BNB_WIDE`) with every linear but lm_head quantized by ``setting``."""
    return quantize_linears(tiny_qwen3(seed, layers, **BNB_WIDE), setting)


def token_batch(vocab: int = 128, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_gpt2(seed: int = 0, layers: int = 2):
    """GPT-2 architecture: its attention and MLP projections are transformers ``Conv1D``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


# (quantization, quant_type, quant_storage) of the bnb layer kinds the tests build
BNB_SETTINGS = {
    "bnb-nf4": ("4bit", "nf4", torch.bfloat16),
    "bnb-fp4": ("4bit", "fp4", torch.uint8),
    "bnb-int8": ("8bit", None, None),
}


def quantize_linear(linear: torch.nn.Linear, setting: str) -> torch.nn.Module:
    """A bitsandbytes layer quantizing ``linear``'s real weights (on CPU)."""
    import bitsandbytes as bnb

    bits, quant_type, storage = BNB_SETTINGS[setting]
    has_bias = linear.bias is not None
    if bits == "4bit":
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=torch.float32,
            quant_type=quant_type, quant_storage=storage,
        )
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
    q.load_state_dict(linear.state_dict())
    # bitsandbytes quantizes on .to(device). The layer stays in training mode (bnb's
    # default): in eval mode on AVX512-BF16 CPUs bnb 0.50 repacks 4-bit weights, and the
    # repacking fails for in_features < 64 or out_features not a multiple of 32 (this
    # hidden-32 model); that path is tested on its own in test_layers_bnb.py.
    return q.to(linear.weight.device)


def quantize_linears(model: torch.nn.Module, setting: str, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by a bnb layer quantizing its weights."""
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantize_linear(module, setting))
    return model
