"""SVFT: the shared contract per pattern, the paper's equation against a float64 SVD, init, factors, knobs."""

import numpy as np
import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance, assert_model_unchanged, snapshot_model


class TestSVFTConformance(VariantConformance):
    variant = "svft"
    config_kwargs = {"r": 0}  # every singular triplet, as the paper (the kit's default r=4 would truncate)


class TestSVFTBandedConformance(VariantConformance):
    variant = "svft"
    config_kwargs = {"r": 0, "pattern": "banded", "off_diag": 2}


class TestSVFTRandomRecomputedConformance(VariantConformance):
    """Random pattern, top-8 triplets, only M and the pattern saved: a reload recomputes the SVD."""

    variant = "svft"
    config_kwargs = {"r": 8, "pattern": "random", "off_diag": 1, "save_factors": False}


class TestSVFTTopKConformance(VariantConformance):
    variant = "svft"
    config_kwargs = {"r": 0, "pattern": "top_k", "off_diag": 1, "target_names": (r"\.(q_proj|kv_mix)$",)}  # square


def _reference(w: np.ndarray, n: int):
    """Top-n SVD in float64 with numpy, each pair signed so that max |u_i| is positive."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    u, vt = u[:, :n].copy(), vt[:n].copy()
    for i in range(n):
        if u[np.abs(u[:, i]).argmax(), i] < 0:
            u[:, i] *= -1
            vt[i] *= -1
    return u, vt


def _pattern_reference(pattern, n, d, u=None, vt=None):
    """The set of (i, j) positions each pattern allows, written from the paper's definitions."""
    if pattern == "plain":
        return {(i, i) for i in range(n)}
    if pattern == "banded":
        return {(i, j) for i in range(n) for j in range(n) if abs(i - j) <= d}
    k = n * (2 * d + 1) - d * (d + 1)
    scores = np.abs(u.T @ vt.T)  # |u_i . v_j|
    order = np.argsort(-scores, axis=None, kind="stable")[:k]
    return {(int(f) // n, int(f) % n) for f in order}


@pytest.mark.parametrize("pattern,d,r,shape", [("plain", 0, 0, (10, 12)), ("banded", 2, 0, (10, 12)),
                                               ("banded", 1, 5, (12, 10)), ("top_k", 1, 0, (9, 9)),
                                               ("random", 2, 6, (10, 12))])
def test_equation_matches_the_paper_in_float64(pattern, d, r, shape):
    torch.manual_seed(0)
    d_out, d_in = shape
    layer = nn.Linear(d_in, d_out)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="svft", r=r, pattern=pattern, off_diag=d))
    n = r or min(shape)
    u, vt = _reference(layer.weight.detach().numpy(), n)
    pos = list(zip(layer.lora_rows.long().tolist(), layer.lora_cols.long().tolist()))
    assert len(pos) == len(set(pos)) == n * (2 * d + 1) - d * (d + 1)
    if pattern != "random":
        assert set(pos) == _pattern_reference(pattern, n, d, u, vt)
    with torch.no_grad():
        layer.lora_M.normal_()
    m = np.zeros((n, n))
    for (i, j), value in zip(pos, layer.lora_M.detach().double().numpy()):
        m[i, j] = value
    # W' = W + U M V^T
    w_new = layer.weight.detach().double().numpy() + u @ m @ vt
    x = torch.randn(3, d_in)
    expected = x.double().numpy() @ w_new.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().double().numpy(), expected, atol=1e-5, rtol=1e-5)
    merged, _ = ll.get_variant("svft").hook("merge")(layer, layer.weight.detach(), layer.bias.detach())
    np.testing.assert_allclose(merged.detach().double().numpy(), w_new, atol=1e-5, rtol=1e-5)


def test_init_is_zero_and_factors_are_the_svd():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="svft"))  # r=0: every triplet
    assert torch.equal(model(x), y0)
    for t in att.targets:
        n = min(t.d_in, t.d_out)
        assert t.layer.lora_M.shape == (n,) and not t.layer.lora_M.any() and t.layer.lora_M.dtype == torch.float32
        u, v, w = t.layer.lora_U.double(), t.layer.lora_V.double(), t.layer.weight.double()
        torch.testing.assert_close(u.T @ u, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(v @ v.T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
        # U diag(U^T W V) V^T = W: the frozen factors are W's singular vectors
        torch.testing.assert_close(u @ torch.diag(torch.diag(u.T @ w @ v.T)) @ v, w, atol=1e-5, rtol=0)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_M"}
    model(x).pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in att.trainable_parameters())


def test_save_factors_decides_what_the_checkpoint_holds(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    for save_factors, suffixes in ((True, {"lora_M", "lora_U", "lora_V", "lora_rows", "lora_cols"}),
                                   (False, {"lora_M", "lora_rows", "lora_cols"})):
        model = ToyTransformer()
        ll.attach(model, ll.LoraLiteConfig(variant="svft", pattern="banded", off_diag=1, save_factors=save_factors))
        path = ll.save(model, tmp_path / f"{save_factors}.safetensors")
        with safe_open(str(path), framework="pt") as fh:
            assert {k.rsplit(".", 1)[-1] for k in fh.keys()} == suffixes


def test_saved_factors_and_pattern_win_over_recomputed_ones(tmp_path):
    """A machine whose SVD differs (a sign flip of one pair) or a different seed still reloads exactly."""
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="svft", pattern="random", off_diag=1, seed=3))
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_M.normal_()
            t.layer.lora_U[:, 1].neg_()
            t.layer.lora_V[1].neg_()
            t.layer.lora_rows.copy_(t.layer.lora_rows.flip(0))  # as if another pattern had been drawn
    x = torch.randn(2, 5, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_random_pattern_is_seeded_and_distinct():
    from lora_lite_svft import pattern_positions

    a = pattern_positions("random", 16, 2, seed=5)
    b = pattern_positions("random", 16, 2, seed=5)
    c = pattern_positions("random", 16, 2, seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert len(set(zip(a[0].tolist(), a[1].tolist()))) == 16 * 5 - 6


@pytest.mark.parametrize("kwargs,match", [({"r": 40}, "exceeds"), ({"pattern": "top_k"}, "d_in == d_out"),
                                          ({"r": 2, "pattern": "banded", "off_diag": 2}, "off_diag")])
def test_shapes_a_layer_cannot_take_are_refused_untouched(kwargs, match):
    model = ToyTransformer()
    before = snapshot_model(model)
    with pytest.raises(ll.ConfigError, match=match):
        ll.attach(model, ll.LoraLiteConfig(variant="svft", **kwargs))
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [{"pattern": "diag"}, {"pattern": "plain", "off_diag": 1},
                                    {"pattern": "banded"}, {"off_diag": -1, "pattern": "random"},
                                    {"r": -1}, {"save_factors": "yes"}])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="svft", **kwargs)


class _RowInt8(nn.Module):
    """A toy quantized linear (int8 codes, one scale per row)."""

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
    kind = ll.LayerKind(name="test-svft-int8", matches=lambda m: isinstance(m, _RowInt8),
                        features=lambda m: (m.in_features, m.out_features), read=lambda m: m.dense(), quantized=True)
    ll.register_layer_kind(kind)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(_RowInt8(nn.Linear(32, 48)), nn.GELU(), _RowInt8(nn.Linear(48, 32)))
        codes = [m.weight.detach().clone() for m in (model[0], model[2])]
        x = torch.randn(4, 32)
        y0 = model(x)
        att = ll.attach(model, ll.LoraLiteConfig(variant="svft", r=4))
        assert torch.equal(model(x), y0)
        for t in att.targets:
            u, vt = _reference(t.layer.dense().numpy(), 4)
            np.testing.assert_allclose(t.layer.lora_V.detach().numpy(), vt, atol=1e-5)
        ll.detach(model)
        assert all(torch.equal(m.weight, c) for m, c in zip((model[0], model[2]), codes))
    finally:
        ll.unregister_layer_kind(kind.name)
