"""HiRA: the shared contract, the paper's equation in float64, init, knobs, PEFT parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestHiRAConformance(VariantConformance):
    variant = "hira"


class TestHiRAGaussianConformance(VariantConformance):
    variant = "hira"
    config_kwargs = {"init_weights": "gaussian"}


def _randomise(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def test_equation_matches_the_paper():
    """y' = (W + W o (B A)) x + b, entry by entry in float64."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hira", r=3, alpha=123.0))  # alpha is unused
    _randomise(layer, 1)
    w, a, b = layer.weight.double(), layer.lora_A.double(), layer.lora_B.double()
    w_new = torch.empty_like(w)
    for i in range(10):
        for j in range(12):
            w_new[i, j] = w[i, j] * (1 + sum(b[i, k] * a[k, j] for k in range(3)))
    x = torch.randn(4, 12)
    expected = x.double() @ w_new.T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_update_is_high_rank():
    """rank(W o B A) is not bounded by r: with r=1 the update has full rank (a random W)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hira", r=1))
    _randomise(layer, 2)
    delta = ll.get_variant("hira").hook("merge")(layer, layer.weight.detach().float(), None)[0] - layer.weight
    assert torch.linalg.matrix_rank(delta.double()).item() == 16


def test_init_is_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hira", r=4))
    assert torch.equal(layer.lora_B, torch.zeros(8, 4))
    # kaiming-uniform(a=sqrt(5)) at fan-in 64: uniform in +-1/8
    assert 0.11 < layer.lora_A.abs().max().item() <= 0.125


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = nn.Linear(4096, 8)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hira", r=8, init_weights="gaussian"))
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.005
    assert torch.equal(layer.lora_B, torch.zeros(8, 8))


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="init_weights"):
        ll.LoraLiteConfig(variant="hira", init_weights="lycoris")


def test_unreadable_weight_is_refused_at_attach():
    class Packed(nn.Module):  # linear-like by its attributes, but its weight is integer storage
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 8
            self.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x

    model = nn.Sequential(Packed())
    with pytest.raises(ll.WeightAccessError):
        ll.attach(model, ll.LoraLiteConfig(variant="hira", r=2, target_names=[r"^0$"]))
    assert not ll.attachments(model)


def test_bf16_model_stays_bf16():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16).to(torch.bfloat16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="hira", r=4))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y0 = nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), y0)  # B = 0: exact, and no dtype change


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    names = ["q_proj", "kv_mix", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    base = ours(x).detach()
    theirs = peft.get_peft_model(theirs, peft.HiraConfig(r=4, target_modules=names))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="hira", r=4, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 8
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)  # both the identity at init
    with torch.no_grad():
        for i, t in enumerate(att.targets):
            _randomise(t.layer, 10 + i)
            t.layer.lora_A.mul_(0.3)
            peft_layer = theirs.get_submodule("base_model.model." + t.name)
            peft_layer.hira_A["default"].copy_(t.layer.lora_A)
            peft_layer.hira_B["default"].copy_(t.layer.lora_B)
    out, ref = ours(x), theirs(x)
    assert (out - base).abs().max() > 1e-2  # the adapters act
    err = (out - ref).abs().max().item()
    assert err <= 1e-5, err
    # merged weights too: ours merged == PEFT merged
    ll.merge(ours)
    theirs.merge_adapter()
    for t in att.targets:
        peft_layer = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)
