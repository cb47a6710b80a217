"""LoRA-XS: the shared contract, the paper's equation against a float64 SVD, init, factors, knobs."""

import numpy as np
import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestLoRAXSConformance(VariantConformance):
    variant = "lora_xs"


class TestLoRAXSRecomputedFactorsConformance(VariantConformance):
    """Only R is saved; a reload recomputes the SVD (exact on the same machine)."""

    variant = "lora_xs"
    config_kwargs = {"save_factors": False}


def _reference_factors(w: np.ndarray, r: int):
    """Top-r SVD in float64 with numpy, each pair signed so that max |u_i| is positive."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    u, s, vt = u[:, :r].copy(), s[:r], vt[:r].copy()
    for i in range(r):
        if u[np.abs(u[:, i]).argmax(), i] < 0:
            u[:, i] *= -1
            vt[i] *= -1
    return u, s, vt


@pytest.mark.parametrize("alpha", [4.0, 8.0, 1.0])
def test_equation_matches_the_paper_in_float64(alpha):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lora_xs", r=4, alpha=alpha))
    with torch.no_grad():
        layer.lora_R.normal_()
    u, s, vt = _reference_factors(layer.weight.detach().numpy(), 4)
    rr = layer.lora_R.detach().double().numpy()
    # W' = W + (alpha / r) U_r R S_r V_r^T   (official: lora_B = U_r, lora_A = S_r V_r^T, R in between)
    w_new = layer.weight.detach().double().numpy() + alpha / 4 * u @ rr @ np.diag(s) @ vt
    x = torch.randn(3, 12)
    expected = x.double().numpy() @ w_new.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.lora_B.detach().numpy(), u, atol=1e-5)
    np.testing.assert_allclose(layer.lora_A.detach().numpy(), np.diag(s) @ vt, atol=1e-5)


def test_init_is_zero_and_factors_are_the_top_r_part():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4))
    assert torch.equal(model(x), y0)  # R = 0: exact, and the weight is never written
    for t in att.targets:
        assert torch.equal(t.layer.lora_R, torch.zeros(4, 4)) and t.layer.lora_R.dtype == torch.float32
        assert not t.layer.lora_A.requires_grad and not t.layer.lora_B.requires_grad
        b, a, w = t.layer.lora_B.double(), t.layer.lora_A.double(), t.layer.weight.double()
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)  # U_r orthonormal
        sv = torch.linalg.svdvals(w)
        torch.testing.assert_close(a.norm(dim=1), sv[:4], atol=1e-5, rtol=1e-5)  # rows of A: norms S_r
        # Eckart-Young: B A is the best rank-4 approximation
        torch.testing.assert_close(torch.linalg.matrix_norm(w - b @ a), sv[4:].norm(), atol=1e-5, rtol=1e-5)
    assert [n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad] == ["lora_R"] * len(att)


def test_gradient_reaches_r_from_zero():
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4))
    model(torch.randn(2, 5, 32)).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.trainable_parameters())


def test_save_factors_decides_what_the_checkpoint_holds(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    for save_factors, suffixes in ((True, {"lora_A", "lora_B", "lora_R"}), (False, {"lora_R"})):
        model = ToyTransformer()
        ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4, save_factors=save_factors))
        path = ll.save(model, tmp_path / f"{save_factors}.safetensors")
        with safe_open(str(path), framework="pt") as fh:
            assert {k.rsplit(".", 1)[-1] for k in fh.keys()} == suffixes


def test_saved_factors_win_over_a_recomputed_svd(tmp_path):
    """A machine whose SVD differs (here: a sign flip of one pair) still reloads exactly."""
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4))
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_R.normal_()
            t.layer.lora_A[1].neg_()  # as if the trained-on SVD had signed pair 1 the other way
            t.layer.lora_B[:, 1].neg_()
    x = torch.randn(2, 5, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_recomputed_factors_are_deterministic():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    from lora_lite_lora_xs import svd_factors

    a1, b1 = svd_factors(w, 6)
    a2, b2 = svd_factors(w.clone(), 6)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert (b1.gather(0, b1.abs().argmax(0, keepdim=True)) > 0).all()  # the sign rule


def test_bf16_storage_keeps_r_fp32_and_the_activation_dtype():
    torch.manual_seed(0)
    model = ToyTransformer().to(torch.bfloat16)
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4, dtype=torch.bfloat16))
    t = att.targets[0]
    assert t.layer.lora_R.dtype == torch.float32 and t.layer.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        t.layer.lora_R.normal_()
    assert model(torch.randn(2, 5, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_r_larger_than_layer_is_a_config_error():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="exceeds"):
        ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=20))  # k_proj is 32 -> 16
    assert not ll.attachments(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"save_factors": "yes"}, {"r": 0}, {"alpha": 0}])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="lora_xs", **kwargs)


class _RowInt8(nn.Module):
    """A toy quantized linear (int8 codes, one scale per row): read-only use is exact."""

    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().amax(dim=1).clamp_min(1e-12) / 127
        self.register_buffer("scale", scale)
        self.weight = nn.Parameter(torch.round(lin.weight.detach() / scale[:, None]).to(torch.int8), requires_grad=False)

    def dense(self):
        return self.weight.float() * self.scale[:, None]

    def forward(self, x):
        return nn.functional.linear(x, self.dense())


def test_quantized_layers_use_the_dequantized_weight_and_stay_exact():
    kind = ll.LayerKind(name="test-xs-int8", matches=lambda m: isinstance(m, _RowInt8),
                        features=lambda m: (m.in_features, m.out_features), read=lambda m: m.dense(), quantized=True)
    ll.register_layer_kind(kind)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(_RowInt8(nn.Linear(32, 48)), nn.GELU(), _RowInt8(nn.Linear(48, 32)))
        codes = [m.weight.detach().clone() for m in (model[0], model[2])]
        x = torch.randn(4, 32)
        y0 = model(x)
        att = ll.attach(model, ll.LoraLiteConfig(variant="lora_xs", r=4))
        assert torch.equal(model(x), y0)
        for t in att.targets:
            u, s, vt = _reference_factors(t.layer.dense().numpy(), 4)
            np.testing.assert_allclose(t.layer.lora_A.detach().numpy(), np.diag(s) @ vt, atol=1e-5)
        ll.detach(model)
        assert all(torch.equal(m.weight, c) for m, c in zip((model[0], model[2]), codes))
    finally:
        ll.unregister_layer_kind(kind.name)
