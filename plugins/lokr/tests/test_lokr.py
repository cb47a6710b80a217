"""LoKr: the shared contract (full, decomposed, lycoris init, both delta forms), the
Kronecker equation in float64, factorisation, init, knobs, PEFT parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance
from lora_lite_lokr import factorization


class TestLoKrConformance(VariantConformance):
    variant = "lokr"


class TestLoKrDecomposeBothConformance(VariantConformance):
    variant = "lokr"
    config_kwargs = {"r": 1, "decompose_both": True}  # r=1 < max(l, m)/2: both factors are rank-1 products


class TestLoKrLycorisDenseConformance(VariantConformance):
    variant = "lokr"
    config_kwargs = {"r": 1, "init_weights": "lycoris", "delta_form": "dense", "decompose_factor": 2}


def _adapter(layer):
    return {n: p for n, p in layer.named_parameters() if n.startswith("lora_")}


def _randomise(layer, seed, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _adapter(layer).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _factor(layer, i):
    p = _adapter(layer)
    return p[f"lora_w{i}"].double() if f"lora_w{i}" in p else p[f"lora_w{i}_a"].double() @ p[f"lora_w{i}_b"].double()


@pytest.mark.parametrize("form", ["factorised", "dense"])
@pytest.mark.parametrize("knobs", [{"r": 4}, {"r": 1, "decompose_both": True}, {"r": 2, "decompose_factor": 2}])
def test_equation_matches_the_paper(form, knobs):
    """delta[a k + b, c n + d] = s W1[a, c] W2[b, d], entry by entry in float64."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lokr", alpha=3, delta_form=form, **knobs))
    _randomise(layer, 1)
    w1, w2 = _factor(layer, 1), _factor(layer, 2)
    (l, m), (k, n) = w1.shape, w2.shape
    assert l * k == 20 and m * n == 12
    delta = torch.empty(20, 12, dtype=torch.float64)
    for a in range(l):
        for b in range(k):
            for c in range(m):
                for d in range(n):
                    delta[a * k + b, c * n + d] = w1[a, c] * w2[b, d]
    x = torch.randn(3, 12)
    expected = x.double() @ (layer.weight.double() + 3 / knobs["r"] * delta).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_factorization_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(32, 16) == (16, 2)  # a dividing factor is taken as the first side, as PEFT does
    assert factorization(4096) == (64, 64)


def test_factorization_equals_peft_s():
    pytest.importorskip("peft")
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 600):
        for f in (-1, 1, 2, 3, 4, 6, 8, 16, 100):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_shapes_follow_peft_s_rules():
    def shapes(d_in, d_out, **kw):
        layer = nn.Linear(d_in, d_out)
        ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lokr", target_names=[r"^0$"], **kw))
        return {n: tuple(p.shape) for n, p in _adapter(layer).items()}

    # 4096 = 64 x 64: W2 is rank-8 (8 < 64/2); W1 full unless decompose_both
    assert shapes(4096, 4096, r=8) == {"lora_w1": (64, 64), "lora_w2_a": (64, 8), "lora_w2_b": (8, 64)}
    assert shapes(4096, 4096, r=8, decompose_both=True) == {
        "lora_w1_a": (64, 8), "lora_w1_b": (8, 64), "lora_w2_a": (64, 8), "lora_w2_b": (8, 64)
    }
    # r >= max / 2: full factors
    assert shapes(64, 32, r=4) == {"lora_w1": (4, 8), "lora_w2": (8, 8)}
    assert shapes(64, 32, r=4, decompose_factor=2) == {"lora_w1": (2, 2), "lora_w2_a": (16, 4), "lora_w2_b": (4, 32)}


def test_init_default_and_lycoris():
    torch.manual_seed(0)
    a, b = nn.Linear(4096, 64), nn.Linear(4096, 64)
    ll.attach(nn.Sequential(a), ll.LoraLiteConfig(variant="lokr", r=2, decompose_both=True, dtype=torch.bfloat16))
    ll.attach(nn.Sequential(b), ll.LoraLiteConfig(variant="lokr", r=2, decompose_both=True, init_weights="lycoris"))
    pa, pb = _adapter(a), _adapter(b)
    assert torch.equal(pa["lora_w1_a"].float(), torch.zeros_like(pa["lora_w1_a"].float()))
    assert pa["lora_w1_a"].dtype == torch.bfloat16  # the zeroed factor follows dtype, the drawn ones are fp32
    assert all(pa[n].dtype == torch.float32 and pa[n].abs().sum() > 0 for n in ("lora_w1_b", "lora_w2_a", "lora_w2_b"))
    assert torch.equal(pb["lora_w2_b"], torch.zeros_like(pb["lora_w2_b"]))
    assert all(pb[n].abs().sum() > 0 for n in ("lora_w1_a", "lora_w1_b", "lora_w2_a"))
    # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in); W2b is (r, 64) with fan-in 64
    assert 0.11 < pa["lora_w2_b"].abs().max().item() <= 0.125


def test_auto_form_and_both_forms_agree_with_gradients():
    layer_big = nn.Linear(512, 512)
    ll.attach(nn.Sequential(layer_big), ll.LoraLiteConfig(variant="lokr", r=4))
    assert layer_big.lora_op.__name__ == "_factorised"
    layer_small = nn.Linear(256, 256)  # at most 256 x 256: dense (a few small matmuls cost more)
    ll.attach(nn.Sequential(layer_small), ll.LoraLiteConfig(variant="lokr", r=4))
    assert layer_small.lora_op.__name__ == "_dense"
    # prime widths split as 1 x d: with a full W2 (r >= max / 2) the Kronecker product is W2 itself,
    # and the factorised form only adds an op; with a rank-r W2 it is a LoRA, cheaper factorised
    for r, form in ((300, "_dense"), (4, "_factorised")):
        layer_prime = nn.Linear(509, 521)
        ll.attach(nn.Sequential(layer_prime), ll.LoraLiteConfig(variant="lokr", r=r))
        assert layer_prime.lora_op.__name__ == form

    outs, grads = [], []
    for form in ("factorised", "dense"):
        torch.manual_seed(0)
        layer = nn.Linear(24, 20)
        ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="lokr", r=1, decompose_both=True, delta_form=form))
        _randomise(layer, 3, std=0.5)
        out = layer(torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4)))
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in _adapter(layer).items()})
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4)


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="decompose_factor"):
        ll.LoraLiteConfig(variant="lokr", decompose_factor=0)
    with pytest.raises(ll.ConfigError, match="init_weights"):
        ll.LoraLiteConfig(variant="lokr", init_weights="gaussian")
    with pytest.raises(ll.ConfigError, match="delta_form"):
        ll.LoraLiteConfig(variant="lokr", delta_form="cp")


PARITY = [
    {"r": 4},
    {"r": 1},
    {"r": 1, "decompose_both": True},
    {"r": 2, "decompose_factor": 2},
    {"r": 1, "decompose_both": True, "decompose_factor": 8},
    {"r": 1, "decompose_both": True, "init_weights": "lycoris", "delta_form": "dense"},
]


@pytest.mark.parametrize("knobs", PARITY, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in PARITY])
def test_parity_with_peft(knobs):
    peft = pytest.importorskip("peft")
    names = ["q_proj", "k_proj", "kv_mix", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    base = ours(x).detach()
    peft_knobs = {k: v for k, v in knobs.items() if k not in ("delta_form", "init_weights")}
    if knobs.get("init_weights") == "lycoris":
        peft_knobs["init_weights"] = "lycoris"
    theirs = peft.get_peft_model(theirs, peft.LoKrConfig(alpha=3, target_modules=names, **peft_knobs))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="lokr", alpha=3, target_names=[rf"\.{n}$" for n in names], **knobs))
    assert len(att) == 10
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)  # both the identity at init
    with torch.no_grad():
        for i, t in enumerate(att.targets):
            peft_layer = theirs.get_submodule("base_model.model." + t.name)
            held = {n[len("lokr_"):] for n in peft_layer.adapter_layer_names if "default" in getattr(peft_layer, n)}
            assert held == {n[len("lora_"):] for n in _adapter(t.layer)}, t.name  # the same factors, split the same way
            _randomise(t.layer, 10 + i, std=0.3)
            for n, p in _adapter(t.layer).items():
                getattr(peft_layer, "lokr_" + n[len("lora_"):])["default"].copy_(p)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    out = ours(x)
    assert (out - base).abs().max() > 1e-2  # the adapters act
    err = (out - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    ll.merge(ours)
    theirs.merge_adapter()
    for t in att.targets:
        peft_layer = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)
