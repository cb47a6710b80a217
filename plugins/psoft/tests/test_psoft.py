"""PSOFT: the shared contract, the equation in float64, init, knobs and PEFT parity."""

import numpy as np
import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestPSOFTConformance(VariantConformance):
    variant = "psoft"
    # the update U_r S_r (R - I) V_r^T moves as fast as the layer's singular values allow: on GPT-2's
    # small init (std 0.02) lr 1e-2 cut the loss by only 4.4% in 20 steps
    train_lr = 3e-2


class TestPSOFTRecomputedFactorsConformance(VariantConformance):
    """Only Q, a, b are saved; a reload recomputes the seeded low-rank SVD (exact on the same machine)."""

    variant = "psoft"
    config_kwargs = {"save_factors": False, "svd": "lowrank", "niter": 2}


class TestPSOFTFreeRConformance(VariantConformance):
    variant = "psoft"
    config_kwargs = {"orth": False, "ab_svd_init": "pissa_init"}


def _cayley64(triu: np.ndarray, r: int) -> np.ndarray:
    q = np.zeros((r, r))
    q[np.triu_indices(r, 1)] = triu
    q = q - q.T
    eye = np.eye(r)
    return (eye + q) @ np.linalg.inv(eye - q)


@pytest.mark.parametrize("ab_svd_init", ["psoft_init", "pissa_init"])
@pytest.mark.parametrize("alpha", [8.0, 2.0])
def test_equation_in_float64(ab_svd_init, alpha):
    """W' = W + s B (diag(b) C(Q) diag(a) - I) A with the factors from a float64 numpy SVD."""
    torch.manual_seed(0)
    r = 4
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="psoft", r=r, alpha=alpha, ab_svd_init=ab_svd_init))
    with torch.no_grad():
        layer.lora_Q.normal_(0, 0.3)
        layer.lora_mag_a.uniform_(0.5, 1.5)
        layer.lora_mag_b.uniform_(0.5, 1.5)
    w = layer.weight.detach().double().numpy()
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    u, sv, vt = u[:, :r], sv[:r], vt[:r]
    s = alpha / r
    if ab_svd_init == "psoft_init":
        a, b = vt, u * (sv / s)
    else:
        a, b = np.sqrt(sv / s)[:, None] * vt, u * np.sqrt(sv / s)
    # the stored factors equal the float64 ones up to each pair's sign (LAPACK's choice): align them
    sign = np.sign(np.sum(layer.lora_A.detach().double().numpy() * a, axis=1))
    a, b = a * sign[:, None], b * sign[None, :]
    np.testing.assert_allclose(layer.lora_A.detach().numpy(), a, atol=1e-5)
    rot = layer.lora_mag_b.detach().double().numpy()[:, None] * _cayley64(layer.lora_Q.detach().double().numpy(), r)
    rot = rot * layer.lora_mag_a.detach().double().numpy()[None, :]
    w_new = w + s * b @ (rot - np.eye(r)) @ a
    x = torch.randn(3, 12)
    expected = x.double().numpy() @ w_new.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_cayley_is_orthogonal_and_psoft_init_rotates_the_principal_part():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="psoft", r=6, alpha=3.0, mag_a=False, mag_b=False))
    with torch.no_grad():
        layer.lora_Q.normal_()
    from lora_lite_psoft import rotation

    rot = rotation(layer, torch.float64)
    torch.testing.assert_close(rot.T @ rot, torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    a = layer.lora_A.double()
    torch.testing.assert_close(a @ a.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)  # row-orthonormal
    # s B A is the rank-r part of W: Eckart-Young residual
    w = layer.weight.double()
    sv = torch.linalg.svdvals(w)
    resid = w - 0.5 * layer.lora_B.double() @ a
    torch.testing.assert_close(torch.linalg.matrix_norm(resid), sv[6:].norm(), atol=1e-5, rtol=1e-5)


def test_init_is_exact_identity_and_only_the_small_tensors_train():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="psoft", r=4))
    assert torch.equal(model(x), y0)  # R = I exactly and W is never written
    names = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
    assert names == ["lora_Q", "lora_mag_a", "lora_mag_b"]
    assert all(p.dtype == torch.float32 for p in att.trainable_parameters())
    assert sum(p.numel() for p in att.trainable_parameters()) == len(att) * (6 + 4 + 4)


def test_neumann_series_is_peft_s():
    torch.manual_seed(0)
    from lora_lite_psoft import rotation

    layer = nn.Linear(16, 16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="psoft", r=5, use_cayley_neumann=True,
                                                      num_cayley_neumann_terms=5, mag_a=False, mag_b=False))
    with torch.no_grad():
        layer.lora_Q.normal_(0, 0.05)
    q = torch.zeros(5, 5, dtype=torch.float64)
    q[tuple(torch.triu_indices(5, 5, 1))] = layer.lora_Q.double()
    q = q - q.T
    eye = torch.eye(5, dtype=torch.float64)
    expected = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(rotation(layer, torch.float64), expected, atol=1e-12, rtol=0)


def test_r_larger_than_layer_is_a_config_error():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="exceeds"):
        ll.attach(model, ll.LoraLiteConfig(variant="psoft", r=20))  # k_proj is 32 -> 16
    assert not ll.attachments(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [
    {"niter": -1}, {"num_cayley_neumann_terms": 0}, {"cayley_neumann_eps": 1.5},
    {"ab_svd_init": "lora"}, {"svd": "exact"}, {"orth": False, "use_cayley_neumann": True}, {"save_factors": "yes"},
])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="psoft", **kwargs)


def _peft_pair(names, r, **peft_kwargs):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.PsoftConfig(r=r, psoft_alpha=2 * r, target_modules=names, **peft_kwargs))
    return ours, theirs


_KNOBS = {  # ours -> PEFT's name
    "orth": "psoft_orth", "mag_a": "psoft_mag_a", "mag_b": "psoft_mag_b", "ab_svd_init": "ab_svd_init",
    "use_cayley_neumann": "use_cayley_neumann", "num_cayley_neumann_terms": "num_cayley_neumann_terms",
    "cayley_neumann_eps": "cayley_neumann_eps", "svd": "psoft_svd", "niter": "psoft_svd_lowrank_niter",
}


@pytest.mark.parametrize("knobs", [
    {},
    {"ab_svd_init": "pissa_init", "mag_a": False},
    {"orth": False, "mag_b": False},
    {"use_cayley_neumann": True, "num_cayley_neumann_terms": 4, "cayley_neumann_eps": 0.9},
    {"svd": "lowrank", "niter": 3},
])
def test_parity_with_peft(knobs):
    names = ["q_proj", "kv_mix", "down_proj"]
    r = 4
    ours, theirs = _peft_pair(names, r, **{_KNOBS[k]: v for k, v in knobs.items()})
    att = ll.attach(ours, ll.LoraLiteConfig(variant="psoft", r=r, alpha=2 * r, target_names=[rf"\.{n}$" for n in names],
                                            **knobs))
    assert len(att) == 6
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters())
    x = torch.randn(2, 5, 32)
    for t in att.targets:  # same SVD call: the same frozen factors, bit for bit
        mod = theirs.get_submodule("base_model.model." + t.name)
        a, b = mod._get_psoft_ab_cache_buffers("default")
        torch.testing.assert_close(t.layer.lora_A, a, atol=0, rtol=0)
        torch.testing.assert_close(t.layer.lora_B, b, atol=0, rtol=0)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in att.targets:
            orth = theirs.get_submodule("base_model.model." + t.name).psoft_R["default"]
            mine = t.layer.lora_Q if knobs.get("orth", True) else t.layer.lora_R
            mine.add_(torch.randn(mine.shape, generator=g) * 0.2)
            orth.weight.copy_(mine)
            if orth.vector_b is not None:
                t.layer.lora_mag_b.uniform_(0.5, 1.5, generator=g)
                orth.vector_b.copy_(t.layer.lora_mag_b)
            if orth.vector_a is not None:
                t.layer.lora_mag_a.uniform_(0.5, 1.5, generator=g)
                orth.vector_a.copy_(t.layer.lora_mag_a)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    # and merged: PEFT's merge against ours
    theirs.merge_adapter()
    ll.merge(ours)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
