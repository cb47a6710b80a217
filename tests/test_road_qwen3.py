"""RoAd on a Qwen3-architecture model: parity with PEFT's RoAd for every road_variant on
all linear layers, given the same angles and scales."""

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kind", ["road_1", "road_2", "road_4"])
def test_parity_with_peft_on_qwen3(kind):
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_qwen3(), tiny_qwen3()
    theirs = peft.get_peft_model(theirs, peft.RoadConfig(variant=kind, group_size=8, target_modules=NAMES))
    att = ll.attach(ours, ll.LoraLiteConfig(
        variant="road", road_variant=kind, group_size=8, target_names=[rf"\.{n}$" for n in NAMES]))
    assert len(att) == 14
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            t.layer.lora_theta.normal_(0.0, 0.5)
            t.layer.lora_alpha.normal_(1.0, 0.3)
            p.road_theta["default"].copy_(t.layer.lora_theta)
            p.road_alpha["default"].copy_(t.layer.lora_alpha)
        batch = token_batch(ours.config.vocab_size)
        err = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    assert err <= 1e-5, f"RoAd {kind} vs PEFT on Qwen3: max abs logit error {err:.2e}"
