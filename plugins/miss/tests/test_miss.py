"""MiSS: the shared contract in its three modes, the equations in float64, init, knobs, PEFT parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance, assert_model_unchanged, snapshot_model


class TestMissConformance(VariantConformance):
    variant = "miss"
    # D multiplies the sum of d_in / r input shards, and Adam moves every entry by ~lr: at the
    # kit's 1e-2 the loss diverges on Qwen3 / GPT-2 / bnb widths; 1e-3 trains everywhere
    train_lr = 1e-3


class TestMissBatConformance(VariantConformance):
    variant = "miss"
    train_lr = 1e-3
    config_kwargs = {"mode": "bat"}  # r=4 divides every toy width (16, 32, 64)


class TestMissMiniConformance(VariantConformance):
    variant = "miss"
    train_lr = 1e-3
    config_kwargs = {"mode": "mini", "mini_r": 4}  # 4 divides every toy d_out


def _delta_reference(w, d, mode, mini_r=1):
    """The weight update entry by entry, float64: the modes' equations written out."""
    d_out, d_in = w.shape
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    if mode == "bat":
        r = d.shape[-1]
        for o in range(d_out // r):
            for i in range(d_in // r):
                blk = w[o * r:(o + 1) * r, i * r:(i + 1) * r]
                delta[o * r:(o + 1) * r, i * r:(i + 1) * r] = blk @ d[o] + d[o]
        return delta
    r = d.shape[0]
    for o in range(d_out):
        for j in range(d_in):
            delta[o, j] = d[j % r, o % mini_r] if mode == "mini" else d[j % r, o]
    return delta


@pytest.mark.parametrize("mode,r,d_in,mini_r", [("balance", 4, 12, 1), ("balance", 5, 12, 1), ("mini", 3, 12, 5),
                                               ("bat", 2, 12, 1)])
def test_equation_matches_the_paper_in_float64(mode, r, d_in, mini_r):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="miss", r=r, mode=mode, mini_r=mini_r))
    with torch.no_grad():
        layer.lora_D.normal_()
    x = torch.randn(3, d_in)
    w64 = layer.weight.double() + _delta_reference(layer.weight.double(), layer.lora_D.double(), mode, mini_r)
    expected = x.double() @ w64.T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    merged, _ = ll.get_variant("miss").hook("merge")(layer, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(merged.double(), w64.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,shape", [({}, (4, 32)), ({"mode": "bat"}, (8, 4, 4)),
                                          ({"mode": "mini", "mini_r": 8}, (4, 8))])
def test_init_is_zero_and_exact(kwargs, shape):
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    y0 = model(x)
    att = ll.attach(model, ll.LoraLiteConfig(variant="miss", r=4, target_names=[r"\.q_proj$"], **kwargs))
    assert torch.equal(model(x), y0)
    for t in att.targets:
        assert t.layer.lora_D.shape == shape and not t.layer.lora_D.any()
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in att.trainable_parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 40}, "exceeds"),                      # r > d_in = 32
    ({"r": 3, "mode": "bat"}, "divide"),         # 3 does not divide 32
    ({"r": 4, "mode": "mini", "mini_r": 5}, "divide"),  # 5 does not divide 32
])
def test_shapes_a_layer_cannot_take_are_refused_untouched(kwargs, match):
    model = ToyTransformer()
    before = snapshot_model(model)
    with pytest.raises(ll.ConfigError, match=match):
        ll.attach(model, ll.LoraLiteConfig(variant="miss", **kwargs))
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [{"mode": "fast"}, {"mode": True}, {"mini_r": 0, "mode": "mini"},
                                    {"mini_r": 4}, {"r": 0}])
def test_bad_knobs_are_config_errors(kwargs):
    with pytest.raises(ll.ConfigError):
        ll.LoraLiteConfig(variant="miss", **kwargs)


@pytest.mark.parametrize("mode,peft_init,mini_r", [("balance", True, 1), ("bat", "bat", 1), ("mini", "mini", 8)])
def test_parity_with_peft(mode, peft_init, mini_r):
    peft = pytest.importorskip("peft")
    names = ["q_proj", "kv_mix", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(
        theirs, peft.MissConfig(r=4, init_weights=peft_init, mini_r=mini_r, target_modules=names)
    )
    att = ll.attach(ours, ll.LoraLiteConfig(variant="miss", r=4, mode=mode, mini_r=mini_r,
                                            target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 6
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)  # both start at D = 0
    torch.manual_seed(2)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_D.normal_(std=0.1)
            theirs.get_submodule("base_model.model." + t.name).miss_block["default"].copy_(t.layer.lora_D)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    # merged: our merge against PEFT's merge_and_unload
    ll.merge(ours)
    merged = theirs.merge_and_unload()
    err = (ours(x) - merged(x)).abs().max().item()
    assert err <= 1e-5, err
