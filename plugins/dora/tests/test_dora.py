"""DoRA: the shared contract, the paper's equation, parity with PEFT, weight access."""

import math

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestDoRAConformance(VariantConformance):
    variant = "dora"


def _randomise(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=g))


@pytest.mark.parametrize("bias", [True, False])
def test_equation_matches_the_paper(bias):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10, bias=bias)
    x = torch.randn(3, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="dora", r=4, alpha=6))
    _randomise(layer, 1)
    v = layer.weight + (6 / 4) * layer.lora_B @ layer.lora_A
    w_new = layer.lora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    expected = x @ w_new.T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_magnitude_starts_at_the_row_norms_in_fp32():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="dora", r=4, dtype=torch.bfloat16))
    assert layer.lora_magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    torch.testing.assert_close(layer.lora_magnitude, layer.weight.norm(dim=1), atol=1e-6, rtol=1e-6)


def test_identity_is_exact_on_a_bf16_model():
    """m / ||V|| is computed in fp32 and is 1 to far below bf16 spacing, so y passes through bit for bit."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 256).to(torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y0 = layer(x)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="dora", r=4, dtype=torch.bfloat16))
    assert torch.equal(layer(x), y0)


def test_weight_norm_gets_no_gradient():
    """||W + sBA|| is detached: the gradient of m is (W x + s B A x) / ||V|| summed over dy."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10, bias=False)
    x = torch.randn(3, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="dora", r=4, alpha=4))
    _randomise(layer, 2)
    layer(x).sum().backward()
    v = (layer.weight + layer.lora_B @ layer.lora_A).detach()
    expected = (x @ v.T / v.norm(dim=1)).sum(0)
    torch.testing.assert_close(layer.lora_magnitude.grad, expected, atol=1e-5, rtol=1e-5)


def _peft_dora(model, names, r, alpha):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=names, use_dora=True))


def test_parity_with_peft():
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    names = ["q_proj", "v_proj", "kv_mix", "down_proj"]
    theirs = _peft_dora(theirs, names, r=4, alpha=12)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="dora", r=4, alpha=12, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 8
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    with torch.no_grad():
        for i, t in enumerate(att.targets):
            p = theirs.get_submodule("base_model.model." + t.name)
            # PEFT's own magnitude init equals ours before anything moves
            torch.testing.assert_close(t.layer.lora_magnitude, p.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=1e-6)
            _randomise(t.layer, i)
            p.lora_A["default"].weight.copy_(t.layer.lora_A)
            p.lora_B["default"].weight.copy_(t.layer.lora_B)
            p.lora_magnitude_vector["default"].weight.copy_(t.layer.lora_magnitude)
    x = torch.randn(2, 5, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - out_theirs).abs().max() <= 1e-5
    # and the gradients agree tensor by tensor
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        for ours_t, theirs_t in ((t.layer.lora_A, p.lora_A["default"].weight), (t.layer.lora_B, p.lora_B["default"].weight),
                                 (t.layer.lora_magnitude, p.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(ours_t.grad, theirs_t.grad, atol=1e-5, rtol=1e-4)


class _Int8RowwiseLinear(nn.Module):
    """Weights stored as int8 codes plus a per-row scale: reading ``.weight`` as numbers is wrong by ~100x."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def dequantized(self):
        return self.weight.float() * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized(), self.bias)


_INT8 = ll.LayerKind(
    name="test-int8-rowwise",
    matches=lambda layer: isinstance(layer, _Int8RowwiseLinear),
    features=lambda layer: (layer.in_features, layer.out_features),
    read=lambda layer: layer.dequantized(),
    quantized=True,
)


def test_quantized_layers_go_through_dense_weight(monkeypatch):
    import lora_lite.weights as weights

    monkeypatch.setattr(weights, "_KINDS", list(weights._KINDS))
    ll.register_layer_kind(_INT8)
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    q = _Int8RowwiseLinear(dense)
    x = torch.randn(3, 16)
    y0 = q(x)
    ll.attach(nn.Sequential(q), ll.LoraLiteConfig(variant="dora", r=4, alpha=4))
    w = q.dequantized()
    torch.testing.assert_close(q.lora_magnitude, w.norm(dim=1), atol=1e-6, rtol=1e-6)
    assert (q(x) - y0).abs().max() <= 1e-5
    _randomise(q, 3)
    v = w + q.lora_B @ q.lora_A
    expected = x @ (q.lora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)).T + q.bias
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)


def test_unreadable_weight_storage_fails_at_attach():
    class Packed(nn.Module):
        in_features, out_features = 8, 4

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(16, dtype=torch.uint8), requires_grad=False)

        def forward(self, x):
            return x[..., :4]

    model = nn.Sequential(Packed())
    with pytest.raises(ll.WeightAccessError, match="cannot read the dense weight"):
        ll.attach(model, ll.LoraLiteConfig(variant="dora", r=2))
    assert not ll.attachments(model) and not hasattr(model[0], "lora_A")


def test_scaling_is_alpha_over_r():
    layer = nn.Linear(8, 8)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="dora", r=4, alpha=6))
    assert math.isclose(layer.lora_scaling, 1.5)
