"""GOFT / qGOFT: the shared contract and the paper's parallel Givens rotations, checked against an
independent float64 reference built from dense rotation matrices (no PEFT implementation exists)."""

import math

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestGOFTConformance(VariantConformance):
    variant = "goft"  # strict Givens rotations + the length scaler (the kit's r=4 is unused)


class TestGOFTNoScalingConformance(VariantConformance):
    variant = "goft"
    config_kwargs = {"no_scaling": True}


class TestQGOFTConformance(VariantConformance):
    variant = "goft"
    config_kwargs = {"strict_oft": False, "ortho_reg": 1e-3}


def reference_pairs(d):
    """The paper's parallel arrangement, by list manipulation: pair the active coordinates two
    by two, keep the first of each pair (and an odd one out) for the next stage."""
    active, stages = list(range(d)), []
    while len(active) > 1:
        stages.append([(active[2 * k], active[2 * k + 1]) for k in range(len(active) // 2)])
        active = active[::2]
    return stages


def reference_rotation(d, blocks):
    """Dense ``R = G_L ... G_1`` from 2x2 blocks (d - 1, 2, 2), float64, one rotation at a time."""
    rot, k = torch.eye(d, dtype=torch.float64), 0
    for stage in reference_pairs(d):
        g = torch.eye(d, dtype=torch.float64)
        for p, q in stage:
            g[p, p], g[p, q], g[q, p], g[q, q] = blocks[k, 0, 0], blocks[k, 0, 1], blocks[k, 1, 0], blocks[k, 1, 1]
            k += 1
        rot = g @ rot
    assert k == d - 1
    return rot


def givens_blocks(phi):
    t = torch.tanh(phi) * math.pi
    return torch.stack([torch.stack([t.cos(), -t.sin()], -1), torch.stack([t.sin(), t.cos()], -1)], -2)


@pytest.mark.parametrize("d_in", [2, 5, 8, 12, 16, 33])
@pytest.mark.parametrize("knobs", [{}, {"no_scaling": True}, {"strict_oft": False}])
def test_matches_dense_float64_reference(d_in, knobs):
    torch.manual_seed(d_in)
    layer = nn.Linear(d_in, 7)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="goft", **knobs))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.add_(torch.randn_like(p) * 0.5)
    strict = knobs.get("strict_oft", True)
    blocks = givens_blocks(layer.lora_theta.detach().double()) if strict else layer.lora_G.detach().double()
    rot = reference_rotation(d_in, blocks)
    if strict:
        torch.testing.assert_close(rot.T @ rot, torch.eye(d_in, dtype=torch.float64), atol=1e-12, rtol=0)
    sigma = torch.ones(d_in, dtype=torch.float64) if knobs.get("no_scaling") else layer.lora_scale.detach().double()
    x = torch.randn(4, d_in, dtype=torch.float64)
    expected = (sigma * (x @ rot.T)) @ layer.weight.double().T + layer.bias.double()
    err = (layer(x.float()).double() - expected).abs().max().item()
    assert err <= 1e-5, err
    # merge folds the same function
    w, b = ll.get_variant("goft").hook("merge")(layer, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(w.double(), layer.weight.double() @ torch.diag(sigma) @ rot, atol=1e-5, rtol=1e-5)


def test_parallel_structure_is_log_depth_and_reaches_every_direction():
    for d in [2, 3, 7, 8, 64, 100]:
        stages = reference_pairs(d)
        assert len(stages) == math.ceil(math.log2(d)) and sum(map(len, stages)) == d - 1
        for stage in stages:  # rotations of a stage are disjoint: they commute and run in parallel
            flat = [i for pair in stage for i in pair]
            assert len(set(flat)) == len(flat)
    # d - 1 rotations in this tree gather any vector onto e_0 (so R^T e_0 reaches every direction):
    # choose each angle from the norms of the two subtrees it joins
    d = 12
    v = torch.randn(d, dtype=torch.float64)
    blocks, carried, k = torch.zeros(d - 1, 2, 2, dtype=torch.float64), v.clone(), 0
    for stage in reference_pairs(d):
        for p, q in stage:
            t = math.atan2(carried[q].item(), carried[p].item())  # rotate (x_p, x_q) onto (r, 0)
            blocks[k] = torch.tensor([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]], dtype=torch.float64)
            carried[p], carried[q] = math.hypot(carried[p].item(), carried[q].item()), 0.0
            k += 1
    got = reference_rotation(d, blocks) @ v
    torch.testing.assert_close(got, v.norm() * torch.eye(d, dtype=torch.float64)[0], atol=1e-12, rtol=0)


def test_identity_at_init_is_exact():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    base = model(x).detach()
    for knobs in ({}, {"strict_oft": False}, {"no_scaling": True}):
        att = ll.attach(model, ll.LoraLiteConfig(variant="goft", **knobs))
        assert torch.equal(model(x), base)
        att.detach()
    att = ll.attach(model, ll.LoraLiteConfig(variant="goft"))
    q = model.layers[0].q_proj
    assert q.lora_theta.shape == (31,) and q.lora_scale.shape == (32,) and q.lora_scale.dtype == torch.float32
    model(x).pow(2).mean().backward()
    assert q.lora_theta.grad.abs().sum() > 0 and q.lora_scale.grad.abs().sum() > 0


def test_quasi_givens_regularizer():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
    att = ll.attach(model, ll.LoraLiteConfig(variant="goft", strict_oft=False, ortho_reg=0.5,
                                             target_names=[r"^0$", r"^1$"]))
    assert ll.regularization_loss(model).item() == 0.0
    with torch.no_grad():
        model[0].lora_G[0] = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # ||G^T G - I||_F^2 = (4 - 1)^2 = 9, weighted by 0.5
    assert ll.regularization_loss(model).item() == pytest.approx(4.5)
    ll.regularization_loss(model).backward()
    assert model[0].lora_G.grad.abs().sum() > 0
    att.detach()
    ll.attach(model, ll.LoraLiteConfig(variant="goft", strict_oft=False, target_names=[r"^0$"]))
    assert float(ll.regularization_loss(model) or 0.0) == 0.0  # ortho_reg=0: no term


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="ortho_reg must be"):
        ll.LoraLiteConfig(variant="goft", strict_oft=False, ortho_reg=-1.0)
    with pytest.raises(ll.ConfigError, match="strict_oft=False"):
        ll.LoraLiteConfig(variant="goft", ortho_reg=0.1)
    model = nn.Sequential(nn.Linear(1, 4))
    with pytest.raises(ll.ConfigError, match="d_in >= 2"):
        ll.attach(model, ll.LoraLiteConfig(variant="goft", target_names=[r"^0$"]))
    assert not ll.attachments(model)
