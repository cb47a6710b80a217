"""LoHa: the shared contract (both delta forms), the equation in float64, init, knobs, PEFT parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

NAMES = ("lora_w1_a", "lora_w1_b", "lora_w2_a", "lora_w2_b")


class TestLoHaConformance(VariantConformance):
    variant = "loha"


class TestLoHaFactorisedConformance(VariantConformance):
    variant = "loha"
    config_kwargs = {"delta_form": "factorised"}


class TestLoHaDenseConformance(VariantConformance):
    variant = "loha"
    config_kwargs = {"delta_form": "dense"}


def _randomise(layer, seed, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in NAMES:
            p = getattr(layer, n)
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("form", ["factorised", "dense"])
def test_equation_matches_the_paper(form):
    """y' = y + (alpha/r) ((W1a W1b) o (W2a W2b)) x, each entry as a double sum, float64."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="loha", r=3, alpha=6, delta_form=form))
    _randomise(layer, 1)
    w1a, w1b, w2a, w2b = (getattr(layer, n).double() for n in NAMES)
    delta = torch.empty(10, 12, dtype=torch.float64)
    for o in range(10):
        for c in range(12):
            delta[o, c] = sum(w1a[o, k] * w1b[k, c] for k in range(3)) * sum(w2a[o, k] * w2b[k, c] for k in range(3))
    x = torch.randn(4, 12)
    expected = x.double() @ (layer.weight.double() + 2.0 * delta).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_auto_form_picks_the_cheaper_per_shape():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(16, 16))
    ll.attach(model, ll.LoraLiteConfig(variant="loha", r=4, target_names=[r"^\d$"]))
    # 16 * 512 < 256 * 256: factorised; 16 * 32 >= 16 * 16: dense
    assert model[0].lora_op.__name__ == "_factorised" and model[1].lora_op.__name__ == "_dense"


def test_both_forms_agree_and_so_do_their_gradients():
    torch.manual_seed(0)
    outs, grads = [], []
    for form in ("factorised", "dense"):
        torch.manual_seed(0)
        layer = nn.Linear(24, 20)
        ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="loha", r=3, delta_form=form))
        _randomise(layer, 3, std=0.5)
        x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
        out = layer(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([getattr(layer, n).grad for n in NAMES])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_init_is_peft_s():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="loha", r=4))
    assert torch.equal(layer.lora_w2_b, torch.zeros(4, 64))
    # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in); fan-in r=4 for the (d_out, r) factors, 64 for W1b
    assert 0.45 < layer.lora_w1_a.abs().max().item() <= 0.5
    assert 0.45 < layer.lora_w2_a.abs().max().item() <= 0.5
    assert 0.11 < layer.lora_w1_b.abs().max().item() <= 0.125


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="delta_form"):
        ll.LoraLiteConfig(variant="loha", delta_form="cp")


def _peft_model(model, names, r, alpha):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoHaConfig(r=r, alpha=alpha, target_modules=list(names)))


def _copy_random(att, theirs, seed):
    with torch.no_grad():
        for i, t in enumerate(att.targets):
            _randomise(t.layer, seed + i, std=0.3)
            peft_layer = theirs.get_submodule("base_model.model." + t.name)
            for n in NAMES:
                getattr(peft_layer, "hada_" + n[len("lora_"):])["default"].copy_(getattr(t.layer, n))


@pytest.mark.parametrize("form", ["auto", "factorised", "dense"])
def test_parity_with_peft(form):
    names = ["q_proj", "kv_mix", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    base = ours(x).detach()
    theirs = _peft_model(theirs, names, r=4, alpha=12)
    att = ll.attach(
        ours, ll.LoraLiteConfig(variant="loha", r=4, alpha=12, delta_form=form, target_names=[rf"\.{n}$" for n in names])
    )
    assert len(att) == 8
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)  # both the identity at init
    _copy_random(att, theirs, 10)
    out = ours(x)
    assert (out - base).abs().max() > 1e-2  # the adapters act
    err = (out - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    ll.merge(ours)
    theirs.merge_adapter()
    for t in att.targets:
        peft_layer = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(3, 5)  # convolutions are not linear-like: the model needs one linear to have a width

    def forward(self, x):
        h = self.c1(x.flatten(2)).reshape(x.shape[0], 8, *x.shape[2:])
        return self.head(self.c2(h))


def test_convolutions_match_peft():
    torch.manual_seed(0)
    ours, theirs = _Convs(), _Convs()
    theirs.load_state_dict(ours.state_dict())
    theirs = _peft_model(theirs, ["c1", "c2"], r=2, alpha=4)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="loha", r=2, alpha=4, target_names=[r"^c1$", r"^c2$"]))
    assert len(att) == 2
    assert att.targets[0].layer.lora_w1_b.shape == (2, 3 * 3) and att.targets[1].layer.lora_w1_b.shape == (2, 8 * 9)
    x = torch.randn(2, 3, 6, 6)
    _copy_random(att, theirs, 20)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    hooked = ours(x).detach()
    ll.merge(ours)
    torch.testing.assert_close(ours(x), hooked, atol=1e-5, rtol=0)
