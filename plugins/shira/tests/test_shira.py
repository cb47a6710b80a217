"""SHiRA: the shared contract, the sparse update in float64, the mask, knobs, PEFT parity."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestSHiRAConformance(VariantConformance):
    variant = "shira"


class TestSHiRASeededConformance(VariantConformance):
    variant = "shira"
    config_kwargs = {"r": 2, "random_seed": 42}


def test_equation_is_a_sparse_additive_update():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="shira", r=2, random_seed=3))
    with torch.no_grad():
        layer.lora_shira_weight.normal_()
    dw = torch.zeros(10, 12, dtype=torch.float64)
    for (i, j), v in zip(layer.lora_index.T.tolist(), layer.lora_shira_weight.double().tolist()):
        dw[i, j] = v  # one entry at a time
    x = torch.randn(3, 12)
    expected = x.double() @ (layer.weight.double() + dw).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(dw) == 10  # sparse, yet full rank: r=2 does not bound it


def test_init_is_zero_and_the_mask_is_peft_s_draw():
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="shira", r=3, random_seed=9))
    for t in att.targets:
        k = 3 * (t.d_in + t.d_out)
        assert torch.equal(t.layer.lora_shira_weight, torch.zeros(k))
        idx = t.layer.lora_index
        assert idx.dtype == torch.int32 and idx.shape == (2, k) and not idx.requires_grad  # PEFT's shira_indices
        flat = torch.randperm(t.d_in * t.d_out, generator=torch.Generator().manual_seed(9))[:k].sort().values
        assert torch.equal(idx[0].long() * t.d_in + idx[1].long(), flat)
        assert (idx[0].long() * t.d_in + idx[1]).unique().numel() == k
    assert all(n.endswith(".lora_shira_weight") for n, p in model.named_parameters() if p.requires_grad)


def test_unseeded_mask_is_the_default_generator_and_reproducible():
    a, b = ToyTransformer(), ToyTransformer()
    torch.manual_seed(1)
    ll.attach(a, ll.LoraLiteConfig(variant="shira", r=2))
    torch.manual_seed(2)  # the global RNG plays no part
    ll.attach(b, ll.LoraLiteConfig(variant="shira", r=2))
    assert torch.equal(a.layers[0].q_proj.lora_index, b.layers[0].q_proj.lora_index)
    c = ToyTransformer()
    ll.attach(c, ll.LoraLiteConfig(variant="shira", r=2, random_seed=1))
    assert not torch.equal(a.layers[0].q_proj.lora_index, c.layers[0].q_proj.lora_index)


def test_a_hand_edited_mask_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="shira", r=2))
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_shira_weight.normal_()
            k = t.layer.lora_index.shape[1]
            flat = torch.arange(k)  # a custom mask: the first k entries
            t.layer.lora_index.copy_(torch.stack([flat // t.d_in, flat % t.d_in]))
    x = torch.randn(2, 5, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "a.safetensors")
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("kwargs, match", [
    ({"random_seed": -1}, "random_seed"),
    ({"mask_type": "weight"}, "mask_type"),
    ({"random_seed": 1.5}, "random_seed"),
])
def test_bad_knobs_are_config_errors(kwargs, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant="shira", **kwargs)


def test_r_too_large_for_a_layer_is_refused_untouched():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="more than"):
        ll.attach(model, ll.LoraLiteConfig(variant="shira", r=9))  # kv_mix: 9 * 32 > 16 * 16
    assert not ll.attachments(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("r, seed", [(4, None), (2, 7), (8, 123)])
def test_parity_with_peft(r, seed):
    peft = pytest.importorskip("peft")
    names = ["q_proj", "v_proj", "kv_mix", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.ShiraConfig(r=r, random_seed=seed, target_modules=names))
    att = ll.attach(ours, ll.LoraLiteConfig(variant="shira", r=r, random_seed=seed, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 10
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    x = torch.randn(2, 5, 32)
    base = ours(x)
    torch.testing.assert_close(base, theirs(x), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            assert torch.equal(p.shira_indices["default"], t.layer.lora_index), "the mask differs from PEFT's"
            t.layer.lora_shira_weight.copy_(0.1 * torch.randn(t.layer.lora_shira_weight.shape, generator=g))
            p.shira_weight["default"].copy_(t.layer.lora_shira_weight)
    ref = theirs(x)
    assert (ref - base).abs().max() > 1e-2, "the copied values do nothing: the test is void"
    err = (ours(x) - ref).abs().max().item()
    assert err <= 1e-5, err
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        w, _ = ll.get_variant("shira").hook("merge")(t.layer, t.layer.weight.detach().float(), None)
        torch.testing.assert_close(w - t.layer.weight, p.get_delta_weight("default").to_dense(), atol=1e-7, rtol=0)
