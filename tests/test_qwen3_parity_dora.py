"""DoRA vs PEFT's LoRA with use_dora=True on a Qwen3-architecture model, same A, B, m."""

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

pytest.importorskip("lora_lite_dora")
peft = pytest.importorskip("peft")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dora_matches_peft_on_qwen3():
    ours, theirs = tiny_qwen3(seed=0), tiny_qwen3(seed=0)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, use_dora=True))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="dora", r=4, alpha=8))
    assert sorted(n.rsplit(".", 1)[-1] for n in att.target_names) == sorted(PROJ * 2)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            torch.testing.assert_close(t.layer.lora_magnitude, p.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
            t.layer.lora_B.copy_(0.1 * torch.randn(t.layer.lora_B.shape, generator=g))
            t.layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(t.layer.lora_magnitude.shape, generator=g))
            p.lora_A["default"].weight.copy_(t.layer.lora_A)
            p.lora_B["default"].weight.copy_(t.layer.lora_B)
            p.lora_magnitude_vector["default"].weight.copy_(t.layer.lora_magnitude)
    batch = token_batch()
    base = theirs.get_base_model()
    with theirs.disable_adapter():
        plain = base(**batch).logits
    out_ours, out_theirs = ours(**batch).logits, theirs(**batch).logits
    assert (out_theirs - plain).abs().max() > 1e-2, "the adapters should matter for this check"
    assert (out_ours - out_theirs).abs().max() <= 1e-5
