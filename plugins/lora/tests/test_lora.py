"""LoRA: the shared contract, and numerical parity with PEFT's LoRA layer."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestLoRAConformance(VariantConformance):
    variant = "lora"


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    x = torch.randn(3, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lora", r=4, alpha=6))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ layer.weight.T + layer.bias + (6 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    names = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=12, target_modules=names))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="lora", r=4, alpha=12, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 6
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    with torch.no_grad():
        for t in att.targets:
            peft_layer = theirs.get_submodule("base_model.model." + t.name)
            t.layer.lora_B.normal_()
            peft_layer.lora_A["default"].weight.copy_(t.layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(t.layer.lora_B)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
