"""GraLoRA: the shared contract (plain and hybrid), the k x k block equation in float64, init, knobs, PEFT parity."""

import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestGraloraConformance(VariantConformance):
    variant = "gralora"


class TestGraloraHybridConformance(VariantConformance):
    variant = "gralora"
    config_kwargs = {"hybrid_r": 2, "gralora_k": 4}


def _delta_reference(a, b, k):
    """delta assembled block by block in float64: block (j, n) = B_{j,n} A_{n,j} of rank r/k."""
    _, n_in, r = a.shape
    n_out, s = b.shape[2], r // k
    delta = torch.zeros(k * n_out, k * n_in, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            a_nj = a[n][:, j * s:(j + 1) * s].T  # (s, d_in / k): slice n's A for output slice j
            b_jn = b[j][n * s:(n + 1) * s].T  # (d_out / k, s): slice j's B fed by input slice n
            delta[j * n_out:(j + 1) * n_out, n * n_in:(n + 1) * n_in] = b_jn @ a_nj
    return delta


@pytest.mark.parametrize("k,r,hybrid_r", [(2, 4, 0), (3, 6, 0), (2, 4, 3), (1, 2, 0)])
def test_equation_matches_the_paper_in_float64(k, r, hybrid_r):
    torch.manual_seed(0)
    layer = nn.Linear(12, 18)
    alpha = 5.0
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="gralora", r=r, alpha=alpha, gralora_k=k,
                                                      hybrid_r=hybrid_r))
    with torch.no_grad():
        for name in ("lora_B", "lora_B_hybrid"):
            if hasattr(layer, name):
                getattr(layer, name).normal_()
    delta = _delta_reference(layer.lora_A.double(), layer.lora_B.double(), k)
    if hybrid_r:
        delta = delta + layer.lora_B_hybrid.double() @ layer.lora_A_hybrid.double()
    w64 = layer.weight.double() + alpha / (r + hybrid_r) * delta
    x = torch.randn(3, 12)
    expected = x.double() @ w64.T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    merged, _ = ll.get_variant("gralora").hook("merge")(layer, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(merged.double(), w64.detach(), atol=1e-5, rtol=1e-5)
    # the granular update reaches rank k r (each block rank r/k), where a rank-r LoRA stops at r
    if not hybrid_r and k > 1:
        assert torch.linalg.matrix_rank(delta).item() == min(k * r, 12)


def test_init_is_zero_and_b_gets_a_gradient():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="gralora", r=4, gralora_k=2, hybrid_r=2))
    assert torch.equal(model(x), y0)
    for t in att.targets:
        assert not t.layer.lora_B.any() and not t.layer.lora_B_hybrid.any()
        # kaiming-uniform(a=sqrt(5)) of a (r, d_in/k) matrix: bound 1/sqrt(d_in/k)
        assert t.layer.lora_A.abs().max() <= (t.d_in / 2) ** -0.5
        assert t.layer.lora_scaling == 16 / (4 + 2)  # alpha / (r + hybrid_r)
    model(x).pow(2).mean().backward()
    for t in att.targets:
        assert t.layer.lora_B.grad.abs().sum() > 0 and t.layer.lora_B_hybrid.grad.abs().sum() > 0


def test_trainable_count_is_a_rank_r_loras():
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="gralora", r=8, gralora_k=4))
    assert sum(p.numel() for p in att.trainable_parameters()) == sum(8 * (t.d_in + t.d_out) for t in att.targets)


@pytest.mark.parametrize("kwargs,expected", [({"r": 6, "gralora_k": 3}, 2),  # 3 divides 6, not the widths
                                             ({"r": 6, "gralora_k": 4}, 2),  # 4 does not divide 6
                                             ({"r": 8, "gralora_k": 4}, 4)])  # fits every toy layer
def test_k_falls_back_to_the_largest_fitting_divisor_with_a_warning(kwargs, expected):
    model = ToyTransformer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        att = ll.attach(model, ll.LoraLiteConfig(variant="gralora", **kwargs))
    fell_back = expected != kwargs["gralora_k"]
    assert any("does not divide" in str(w.message) for w in caught) == fell_back
    for t in att.targets:
        assert t.layer.lora_A.shape[0] == expected and t.layer.lora_A.shape[2] == kwargs["r"]
    x = torch.randn(2, 5, 32)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("kwargs", [{"gralora_k": 0}, {"hybrid_r": -1},
                                    {"gralora_k": 2.0}, {"r": 0}])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="gralora", **kwargs)


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 2)])
def test_init_and_parity_with_peft(k, hybrid_r):
    peft = pytest.importorskip("peft")
    names = ["q_proj", "kv_mix", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs, peft.GraloraConfig(r=8, alpha=12, gralora_k=k, hybrid_r=hybrid_r,
                                                            target_modules=names))
    torch.manual_seed(1)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="gralora", r=8, alpha=12, gralora_k=k, hybrid_r=hybrid_r,
                                            target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 6
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    pairs = {"lora_A": "gralora_A", "lora_B": "gralora_B"}
    for t in att.targets:  # same RNG stream: PEFT's numbers, bit for bit
        mod = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_A, mod.gralora_A["default"], atol=0, rtol=0)
        if hybrid_r:
            torch.testing.assert_close(t.layer.lora_A_hybrid, mod.gralora_A_general["default"].weight, atol=0, rtol=0)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    with torch.no_grad():
        for t in att.targets:
            mod = theirs.get_submodule("base_model.model." + t.name)
            for ours_name, theirs_name in pairs.items():
                getattr(t.layer, ours_name).normal_(std=0.3)
                mod.__getattr__(theirs_name)["default"].copy_(getattr(t.layer, ours_name))
            if hybrid_r:
                t.layer.lora_B_hybrid.normal_(std=0.3)
                mod.gralora_B_general["default"].weight.copy_(t.layer.lora_B_hybrid)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    ll.merge(ours)
    merged = theirs.merge_and_unload()
    err = (ours(x) - merged(x)).abs().max().item()
    assert err <= 1e-5, err
