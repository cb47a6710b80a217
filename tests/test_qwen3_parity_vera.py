"""VeRA vs PEFT's VeRA on a Qwen3-architecture model: same key, same projections and vectors."""

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

pytest.importorskip("lora_lite_vera")
peft = pytest.importorskip("peft")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_vera_matches_peft_on_qwen3():
    ours, theirs = tiny_qwen3(seed=0), tiny_qwen3(seed=0)
    theirs = peft.get_peft_model(theirs, peft.VeraConfig(r=8, target_modules=PROJ, projection_prng_key=11))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="vera", r=8, projection_prng_key=11))
    assert sorted(n.rsplit(".", 1)[-1] for n in att.target_names) == sorted(PROJ * 2)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    # widest input 64 (down_proj), widest output 64 (gate/up): PEFT's shared pair, bit for bit
    assert torch.equal(att.targets[0].layer.lora_vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(att.targets[0].layer.lora_vera_B, theirs.base_model.vera_B["default"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            t.layer.lora_lambda_b.copy_(torch.randn(t.layer.lora_lambda_b.shape, generator=g))
            t.layer.lora_lambda_d.copy_(torch.randn(t.layer.lora_lambda_d.shape, generator=g))
            p.vera_lambda_b["default"].copy_(t.layer.lora_lambda_b)
            p.vera_lambda_d["default"].copy_(t.layer.lora_lambda_d)
    batch = token_batch()
    with theirs.disable_adapter():
        plain = theirs.get_base_model()(**batch).logits
    out_ours, out_theirs = ours(**batch).logits, theirs(**batch).logits
    assert (out_theirs - plain).abs().max() > 1e-2, "the adapters should matter for this check"
    assert (out_ours - out_theirs).abs().max() <= 1e-5
