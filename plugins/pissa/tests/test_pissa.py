"""PiSSA: the shared contract, PEFT init parity, fast init, exact restore."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestPiSSAConformance(VariantConformance):
    variant = "pissa"


class TestPiSSALowRankConformance(VariantConformance):
    variant = "pissa"
    config_kwargs = {"svd": "lowrank", "niter": 4}


def _peft_pissa(model, init, r, alpha, names):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=names, init_lora_weights=init)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("alpha", [4, 16])
def test_full_svd_init_equals_peft(alpha):
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = _peft_pissa(theirs, "pissa", 4, alpha, ["q_proj", "up_proj"])
    att = ll.attach(ours, ll.LoraLiteConfig(variant="pissa", r=4, alpha=alpha, target_names=[r"q_proj$", r"up_proj$"]))
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_A, p.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.layer.lora_B, p.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.layer.weight, p.base_layer.weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_lowrank_init_equals_peft_niter_with_the_same_seed():
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = _peft_pissa(theirs, True, 4, 8, ["layers.0.q_proj"])
    p = theirs.get_submodule("base_model.model.layers.0.q_proj")
    # PEFT draws svd_lowrank's sketch from the global RNG: run its init on the same seed
    torch.manual_seed(7)
    p.pissa_init("default", "pissa_niter_4")
    cfg = ll.LoraLiteConfig(variant="pissa", r=4, alpha=8, svd="lowrank", niter=4, seed=7, target_names=[r"layers\.0\.q_proj$"])
    (t,) = ll.attach(ours, cfg).targets
    torch.testing.assert_close(t.layer.lora_A, p.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.layer.lora_B, p.lora_B["default"].weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.layer.weight, p.base_layer.weight, atol=1e-5, rtol=1e-5)


def test_lowrank_captures_the_top_subspace():
    torch.manual_seed(0)
    # a weight with a clear spectral gap: rank-4 signal plus small noise
    w = torch.randn(64, 4) @ torch.randn(4, 48) + 1e-3 * torch.randn(64, 48)
    dense = nn.Linear(48, 64, bias=False)
    fast = nn.Linear(48, 64, bias=False)
    dense.weight.data.copy_(w)
    fast.weight.data.copy_(w)
    ll.attach(nn.Sequential(dense), ll.LoraLiteConfig(variant="pissa", r=4, alpha=4))
    ll.attach(nn.Sequential(fast), ll.LoraLiteConfig(variant="pissa", r=4, alpha=4, svd="lowrank", niter=4))
    full_delta = dense.lora_B @ dense.lora_A
    fast_delta = fast.lora_B @ fast.lora_A
    assert (full_delta - fast_delta).abs().max() < 1e-3
    assert dense.weight.abs().max() < 1e-2  # the residual is only the noise


def test_identity_error_is_float_rounding():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(4, 6, 32)
    y0 = model(x)
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=8, alpha=16))
    assert (model(x) - y0).abs().max() < 1e-5


def test_r_larger_than_layer_is_a_config_error():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="exceeds"):
        ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=20))
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_detach_restores_the_weight_bit_for_bit():
    torch.manual_seed(0)
    model = ToyTransformer()
    original = model.layers[0].q_proj.weight.detach().clone()
    ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4))
    assert not torch.equal(model.layers[0].q_proj.weight, original)
    ll.detach(model)
    assert torch.equal(model.layers[0].q_proj.weight, original)


class _RowInt8(nn.Module):
    """A toy quantized linear: int8 codes and one scale per output row (no bitsandbytes needed)."""

    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(torch.zeros(lin.out_features, lin.in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(lin.out_features))
        self.set(lin.weight.detach())

    def set(self, w):
        self.scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.weight.data = torch.round(w / self.scale[:, None]).to(torch.int8)

    def dense(self):
        return self.weight.float() * self.scale[:, None]

    def forward(self, x):
        return nn.functional.linear(x, self.dense())


def _write_row_int8(layer, w):
    old = (layer.weight.data, layer.scale)
    layer.set(w)

    def undo():
        layer.weight.data, layer.scale = old

    return undo


ROW_INT8 = ll.LayerKind(
    name="test-row-int8", matches=lambda m: isinstance(m, _RowInt8), features=lambda m: (m.in_features, m.out_features),
    read=lambda m: m.dense(), write=_write_row_int8, quantized=True,
)


@pytest.fixture
def row_int8_model():
    ll.register_layer_kind(ROW_INT8)
    torch.manual_seed(0)
    model = nn.Sequential(_RowInt8(nn.Linear(32, 48)), nn.GELU(), _RowInt8(nn.Linear(48, 32)))
    yield model
    ll.unregister_layer_kind(ROW_INT8.name)


def test_quantized_layers_are_refused_by_default(row_int8_model):
    codes = [m.weight.detach().clone() for m in row_int8_model if isinstance(m, _RowInt8)]
    with pytest.raises(ll.WeightAccessError, match="quantized='requantize'"):
        ll.attach(row_int8_model, ll.LoraLiteConfig(variant="pissa", r=4))
    assert all(torch.equal(m.weight, c) for m, c in zip([row_int8_model[0], row_int8_model[2]], codes))


def test_requantize_reports_the_identity_error_and_detach_restores_the_codes(row_int8_model, tmp_path):
    model = row_int8_model
    x = torch.randn(4, 32)
    y0 = model(x)
    saved = [(m.weight.detach().clone(), m.scale.clone()) for m in (model[0], model[2])]
    dequantized = [m.dense() for m in (model[0], model[2])]
    with pytest.warns(UserWarning, match="lora_requant_error"):
        att = ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4, alpha=8, quantized="requantize"))
    for t, w in zip(att.targets, dequantized):
        res = t.layer.dense()
        adapted = res + 2.0 * (t.layer.lora_B @ t.layer.lora_A).detach()
        err = float((adapted - w).abs().max() / w.abs().max())
        assert t.layer.lora_requant_error == pytest.approx(err, rel=1e-5)
        # at most half an int8 step of W_res's largest row, relative to max |W|
        assert 0 < err <= 0.5 * float(res.abs().max() / w.abs().max()) / 127 * 1.01
    assert 0 < (model(x) - y0).abs().max() < 1e-2
    path = ll.save(model, tmp_path / "a.safetensors")
    out = model(x).detach()
    ll.detach(model)
    for m, (codes, scale) in zip((model[0], model[2]), saved):
        assert torch.equal(m.weight, codes) and torch.equal(m.scale, scale)
    assert torch.equal(model(x), y0)
    ll.load(model, path)
    assert torch.equal(model(x), out)
