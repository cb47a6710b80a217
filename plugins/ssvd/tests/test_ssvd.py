"""SSVD: the shared contract, the equation in float64, ESPnet's SSVDLinear in float64, init, knobs."""

import numpy as np
import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestSSVDConformance(VariantConformance):
    variant = "ssvd"
    # the update moves at the speed of the layer's singular values (small on GPT-2's std-0.02 init)
    train_lr = 3e-2


class TestSSVDRecomputedFactorsConformance(VariantConformance):
    """Only delta, gate and K are saved; a reload recomputes the SVD (exact on the same machine)."""

    variant = "ssvd"
    train_lr = 3e-2
    config_kwargs = {"save_factors": False, "rotation": "first_order"}


def _separated(layer: nn.Linear) -> nn.Linear:
    """Give the layer a spectrum with gaps of 0.1, so the fp32 SVD the plugin runs agrees with a
    float64 one to ~1e-7 (with near-ties the vectors themselves are ill-conditioned)."""
    d_out, d_in = layer.weight.shape
    n = min(d_out, d_in)
    q1, _ = torch.linalg.qr(torch.randn(d_out, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d_in, n, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.copy_(q1 @ torch.diag(torch.linspace(0.1 * n + 0.5, 0.6, n, dtype=torch.float64)) @ q2.T)
    return layer


def _merged(layer):
    with torch.no_grad():  # as core calls merge
        return ll.get_variant("ssvd").hook("merge")(layer, layer.weight.detach().float(), None)


def _perturb(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_K.copy_(torch.randn(layer.lora_K.shape, generator=g) * 0.3)
        layer.lora_delta_s.copy_(torch.randn(layer.lora_delta_s.shape, generator=g))
        layer.lora_gate.fill_(0.7)


def _params64(layer):
    k = layer.lora_S.shape[0]
    kk = np.zeros((k, k))
    kk[np.triu_indices(k, 1)] = layer.lora_K.detach().double().numpy()
    shift = layer.lora_delta_s.detach().double().numpy() / (1 + np.exp(-layer.lora_gate.item()))
    return kk, shift


def _aligned_svd(layer, w, k, full=False):
    """numpy float64 SVD of ``w``, each top-k pair signed as the plugin's stored factors."""
    u, s, vt = np.linalg.svd(w, full_matrices=full)
    sign = np.sign(np.sum(layer.lora_V.detach().double().numpy() * vt[:k], axis=1))
    u[:, :k] *= sign
    vt[:k] *= sign[:, None]
    return u, s, vt


@pytest.mark.parametrize("shape", [(12, 10), (10, 12)])
def test_equation_in_float64(shape):
    """W' = W + U_k (diag(sigma_k + sigmoid(g) delta) (I - Q)(I + Q)^-1 - diag(sigma_k)) V_k^T."""
    torch.manual_seed(0)
    k = 4
    layer = _separated(nn.Linear(*shape))
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ssvd", r=k))
    _perturb(layer)
    w = layer.weight.detach().double().numpy()
    u, s, vt = _aligned_svd(layer, w, k)
    np.testing.assert_allclose(layer.lora_V.detach().numpy(), vt[:k], atol=1e-5)
    np.testing.assert_allclose(layer.lora_U.detach().numpy(), u[:, :k], atol=1e-5)
    kk, shift = _params64(layer)
    q = np.triu(kk, 1) - np.triu(kk, 1).T
    g = (np.eye(k) - q) @ np.linalg.inv(np.eye(k) + q)
    np.testing.assert_allclose(g.T @ g, np.eye(k), atol=1e-12)  # a rotation
    w_new = w + u[:, :k] @ (np.diag(s[:k] + shift) @ g - np.diag(s[:k])) @ vt[:k]
    x = torch.randn(3, shape[0])
    expected = x.double().numpy() @ w_new.T + layer.bias.detach().double().numpy()
    err = np.abs(layer(x).detach().double().numpy() - expected).max()
    assert err <= 1e-5, err


def _espnet_ssvd_weight64(u, s_pre, v, k, s, gate, k_vec):
    """ESPnet's SSVDLinear weight for out >= in, transcribed to numpy float64:
    u diag(s_pre + pad(s * sigmoid(gate))) [A v[:k]; v[k:]],  A = I, A[i, j] -= 2K, A[j, i] += 2K (i < j)."""
    sigma = s_pre.copy()
    sigma[:k] += s / (1 + np.exp(-gate))
    a = np.eye(k)
    rows, cols = np.triu_indices(k, 1)
    a[rows, cols] -= 2 * k_vec
    a[cols, rows] += 2 * k_vec
    return u @ np.diag(sigma) @ np.concatenate([a @ v[:k], v[k:]], axis=0)


def test_matches_espnet_ssvdlinear_in_float64():
    """rotation='first_order' on a tall layer (d_out >= d_in) is ESPnet's SSVDLinear with the same parameters."""
    torch.manual_seed(0)
    k = 5
    layer = _separated(nn.Linear(12, 20))
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ssvd", r=k, rotation="first_order"))
    _perturb(layer, seed=2)
    w = layer.weight.detach().double().numpy()
    u, s_pre, vt = _aligned_svd(layer, w, k)
    w_esp = _espnet_ssvd_weight64(u, s_pre, vt, k, layer.lora_delta_s.detach().double().numpy(),
                                  layer.lora_gate.item(), layer.lora_K.detach().double().numpy())
    x = torch.randn(4, 12)
    expected = x.double().numpy() @ w_esp.T + layer.bias.detach().double().numpy()
    err = np.abs(layer(x).detach().double().numpy() - expected).max()
    assert err <= 1e-5, err
    merged_w, _ = _merged(layer)
    assert np.abs(merged_w.double().numpy() - w_esp).max() <= 1e-5


def test_cayley_and_first_order_agree_to_first_order():
    torch.manual_seed(0)
    from lora_lite_ssvd import core

    layer = nn.Linear(16, 16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ssvd", r=4))
    with torch.no_grad():
        layer.lora_K.normal_(0, 1e-4)
    exact = core(layer, torch.float64)
    layer.lora_cfg.rotation = "first_order"
    first = core(layer, torch.float64)
    # they differ by 2 Q^2 (I + Q)^-1, second order: relative ~ |K| = 1e-4
    assert (exact - first).abs().max() <= 1e-3 * exact.abs().max()


def test_init_is_exact_identity_and_factors_are_the_top_k_triplets():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="ssvd", r=4))
    assert torch.equal(model(x), y0)  # M = 0 exactly and W is never written
    for t in att.targets:
        u, s, v, w = t.layer.lora_U.double(), t.layer.lora_S.double(), t.layer.lora_V.double(), t.layer.weight.double()
        torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(v @ v.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        sv = torch.linalg.svdvals(w)
        torch.testing.assert_close(s, sv[:4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.linalg.matrix_norm(w - u @ torch.diag(s) @ v), sv[4:].norm(), atol=1e-5, rtol=1e-5)
    names = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
    assert names == ["lora_K", "lora_delta_s", "lora_gate"]
    assert sum(p.numel() for p in att.trainable_parameters()) == len(att) * (6 + 4 + 1)


def test_left_vectors_stay_fixed_and_singular_values_shift():
    """The adapted weight's top-k column space is U_k's; with K = 0 its singular values are sigma + shift."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ssvd", r=3))
    with torch.no_grad():
        layer.lora_delta_s.copy_(torch.tensor([0.5, -0.2, 0.1]))
    w_new, _ = _merged(layer)
    sv_new = torch.linalg.svdvals(w_new.double())
    expected = layer.lora_S.double() + 0.5 * torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    torch.testing.assert_close(sv_new[:3].sort().values, expected.sort().values, atol=1e-5, rtol=0)
    _perturb(layer)
    w_new, _ = _merged(layer)
    delta = (w_new - layer.weight.detach()).double()
    u = layer.lora_U.double()
    torch.testing.assert_close(u @ (u.T @ delta), delta, atol=1e-5, rtol=0)  # the change lives in span(U_k)


def test_saved_factors_win_over_a_recomputed_svd(tmp_path):
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="ssvd", r=4))
    with torch.no_grad():
        for t in att.targets:
            _perturb(t.layer)
            t.layer.lora_V[1].neg_()  # as if the trained-on SVD had signed pair 1 the other way
            t.layer.lora_U[:, 1].neg_()
    x = torch.randn(2, 5, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_r_larger_than_layer_is_a_config_error():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="exceeds"):
        ll.attach(model, ll.LoraLiteConfig(variant="ssvd", r=20))  # k_proj is 32 -> 16
    assert not ll.attachments(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"rotation": "exact"}, {"save_factors": 1}, {"r": 0}])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="ssvd", **kwargs)
