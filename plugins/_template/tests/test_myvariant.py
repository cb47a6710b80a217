import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import VariantConformance


class TestMyVariantConformance(VariantConformance):
    variant = "myvariant"
    config_kwargs = {"gate_init": 1.0}


def test_equation():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(2, 6)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="myvariant", r=2, alpha=4))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_gate.uniform_(0.5, 1.5)
    delta = (4 / 2) * (x @ layer.lora_A.T @ layer.lora_B.T) * layer.lora_gate
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + delta)
