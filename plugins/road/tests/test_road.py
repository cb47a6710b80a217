"""RoAd: the shared contract for each road_variant, the paper's 2x2 rotations written out
as a matrix, and parity with PEFT's RoAd given the same angles and scales."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

# the toy model's widths are 16, 32 and 64; PEFT's default group_size 64 divides only 64
TOY_GROUP = 8


class TestRoAd1Conformance(VariantConformance):
    variant = "road"
    config_kwargs = {"group_size": TOY_GROUP}


class TestRoAd2Conformance(VariantConformance):
    variant = "road"
    config_kwargs = {"group_size": TOY_GROUP, "road_variant": "road_2"}


class TestRoAd4Conformance(VariantConformance):
    variant = "road"
    config_kwargs = {"group_size": TOY_GROUP, "road_variant": "road_4"}


def _rotation_matrix(theta, alpha, kind, d, g):
    """The block-diagonal matrix R of the paper, entry by entry: y' = R y."""
    h = g // 2
    R = torch.zeros(d, d)
    for start in range(0, d, g):
        for i in range(h):
            top, bot = start + i, start + h + i
            if kind == "road_1":
                k = start // 2 + i
                (t1, a1), (t2, a2), (s1, b1), (s2, b2) = [(theta[k], alpha[k])] * 4
            elif kind == "road_2":
                (t1, a1), (s1, b1) = [(theta[top], alpha[top])] * 2
                (t2, a2), (s2, b2) = [(theta[bot], alpha[bot])] * 2
            else:  # road_4: per group, g cosine entries then g sine entries
                c, s = 2 * start, 2 * start + g
                t1, a1, t2, a2 = theta[c + i], alpha[c + i], theta[c + h + i], alpha[c + h + i]
                s1, b1, s2, b2 = theta[s + i], alpha[s + i], theta[s + h + i], alpha[s + h + i]
            R[top, top], R[top, bot] = a1 * torch.cos(t1), -b1 * torch.sin(s1)
            R[bot, top], R[bot, bot] = b2 * torch.sin(s2), a2 * torch.cos(t2)
    return R


@pytest.mark.parametrize("kind", ["road_1", "road_2", "road_4"])
def test_equation_is_a_block_rotation_of_the_output(kind):
    torch.manual_seed(0)
    layer = nn.Linear(12, 16)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="road", road_variant=kind, group_size=8))
    size = {"road_1": 8, "road_2": 16, "road_4": 32}[kind]
    assert layer.lora_theta.shape == layer.lora_alpha.shape == (size,)
    with torch.no_grad():
        layer.lora_theta.normal_()
        layer.lora_alpha.normal_(1.0, 0.3)
    x = torch.randn(3, 12)
    R = _rotation_matrix(layer.lora_theta.detach(), layer.lora_alpha.detach(), kind, 16, 8)
    expected = (x @ layer.weight.T + layer.bias) @ R.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_scales_stay_fp32_and_bad_group_size_is_refused():
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="road", group_size=8, dtype=torch.bfloat16))
    layer = model.layers[0].q_proj
    assert layer.lora_alpha.dtype == torch.float32 and layer.lora_theta.dtype == torch.bfloat16
    with pytest.raises(ll.ConfigError, match="group_size"):
        ll.LoraLiteConfig(variant="road", group_size=7)
    with pytest.raises(ll.ConfigError, match="divisible by group_size=64"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="road"))
    with pytest.raises(ll.ConfigError, match="road_variant"):
        ll.LoraLiteConfig(variant="road", road_variant="road_3")


@pytest.mark.parametrize("kind", ["road_1", "road_2", "road_4"])
def test_parity_with_peft(kind):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    names = ["q_proj", "v_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(theirs, peft.RoadConfig(variant=kind, group_size=8, target_modules=names))
    att = ll.attach(ours, ll.LoraLiteConfig(
        variant="road", road_variant=kind, group_size=8, target_names=[rf"\.{n}$" for n in names]))
    assert len(att) == 8
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)  # identity on both sides
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            t.layer.lora_theta.normal_()
            t.layer.lora_alpha.normal_(1.0, 0.5)
            p.road_theta["default"].copy_(t.layer.lora_theta)
            p.road_alpha["default"].copy_(t.layer.lora_alpha)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, f"RoAd {kind} vs PEFT: max abs error {err:.2e}"
