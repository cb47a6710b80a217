"""OFT: the shared contract, the Cayley(-Neumann) equations, PEFT's layout and parity."""

import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestOFTConformance(VariantConformance):
    variant = "oft"
    # the kit passes r=4; OFT takes r (blocks) or oft_block_size, not both (PEFT's rule)
    config_kwargs = {"r": 0, "oft_block_size": 8}


class TestOFTExactCayleyConformance(VariantConformance):
    variant = "oft"
    config_kwargs = {"oft_block_size": 0, "use_cayley_neumann": False}


def _skew_blocks(vec: torch.Tensor) -> torch.Tensor:
    n, m = vec.shape
    b = next(b for b in range(2, 4096) if b * (b - 1) // 2 == m)
    q = torch.zeros(n, b, b, dtype=vec.dtype)
    for k in range(n):
        q[k][tuple(torch.triu_indices(b, b, 1))] = vec[k]
    return q - q.transpose(1, 2)


def _one_layer(**knobs):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="oft", **knobs))
    with torch.no_grad():
        layer.lora_R.normal_(std=0.1)
    return layer


def _expected(layer, rot_blocks):
    x = torch.randn(3, 12, dtype=torch.float64)
    rot = torch.block_diag(*rot_blocks)
    return x, (x @ rot) @ layer.weight.double().T + layer.bias.double()


def test_exact_cayley_is_orthogonal_and_matches_the_formula():
    layer = _one_layer(r=3, oft_block_size=0, use_cayley_neumann=False)
    assert layer.lora_R.shape == (3, 6)  # 3 blocks of 4: 4*3/2 packed entries each
    eye = torch.eye(4, dtype=torch.float64)
    rots = [(eye - q) @ torch.linalg.inv(eye + q) for q in _skew_blocks(layer.lora_R.double())]
    for rot in rots:
        torch.testing.assert_close(rot.T @ rot, eye, atol=1e-12, rtol=0)
    x, expected = _expected(layer, rots)
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("terms", "coefs"), [(2, [1, 2]), (3, [1, 2, 2, 1]), (4, [1, 2, 2, 1]), (5, [1, 2, 2, 2, 1]), (7, [1, 2, 2, 2, 2, 2, 1])])
def test_cayley_neumann_series(terms, coefs):
    layer = _one_layer(oft_block_size=6, r=0, num_cayley_neumann_terms=terms)
    rots = [sum(c * torch.linalg.matrix_power(q, k) for k, c in enumerate(coefs)) for q in _skew_blocks(layer.lora_R.double())]
    x, expected = _expected(layer, rots)
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_coft_projects_each_block_into_the_eps_ball():
    layer = _one_layer(r=2, oft_block_size=0, coft=True, eps=1e-3)
    big = layer.lora_R.detach().clone()
    layer(torch.randn(2, 12))
    radius = 1e-3 / 2**0.5  # eps / sqrt(n_blocks)
    frob = layer.lora_R.detach().norm(dim=1) * 2**0.5
    torch.testing.assert_close(frob, torch.full((2,), radius), atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(layer.lora_R.detach() / frob[:, None], big / big.norm(dim=1, keepdim=True) / 2**0.5)


def test_knobs_are_validated():
    for knobs, match in [
        ({"r": 4}, "exactly one"), ({"r": 0, "oft_block_size": 0}, "exactly one"),
        ({"num_cayley_neumann_terms": 1}, "never trains"), ({"eps": 0.0}, "eps"), ({"r": -1, "oft_block_size": 0}, "r must"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.LoraLiteConfig(variant="oft", **knobs)
    with pytest.raises(ll.ConfigError, match="size 1"):
        ll.attach(nn.Sequential(nn.Linear(5, 5)), ll.LoraLiteConfig(variant="oft", r=5, oft_block_size=0))


def test_block_size_that_does_not_divide_d_in_moves_to_the_nearest_divisor():
    with pytest.warns(UserWarning, match="oft_block_size=32 does not divide d_in=48; using 24"):
        ll.attach(nn.Sequential(layer := nn.Linear(48, 4)), ll.LoraLiteConfig(variant="oft"))
    assert layer.lora_R.shape == (2, 24 * 23 // 2)
    with pytest.warns(UserWarning, match="r=5 does not divide d_in=48; using 4"):
        ll.attach(nn.Sequential(layer := nn.Linear(48, 4)), ll.LoraLiteConfig(variant="oft", r=5, oft_block_size=0))
    assert layer.lora_R.shape == (4, 12 * 11 // 2)


def test_backward_keeps_one_activation_copy():
    layer = nn.Linear(64, 64)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="oft", oft_block_size=8))
    rotate = ll.get_variant("oft").hook("forward_input")

    def saved_numel(tokens):
        saved = []
        x = torch.randn(tokens, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            rotate(layer, x)
        return sum(saved)

    assert (saved_numel(300) - saved_numel(100)) / 200 == 64


@pytest.mark.parametrize(
    "knobs",
    [
        {"oft_block_size": 8},
        {"oft_block_size": 32},  # 16-wide layers: PEFT and we both move it to 16
        {"r": 4, "oft_block_size": 0, "num_cayley_neumann_terms": 3},
        {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False},
        {"oft_block_size": 8, "coft": True, "eps": 1e-2},
    ],
)
def test_parity_with_peft(knobs):
    peft = pytest.importorskip("peft")
    names = ["q_proj", "kv_mix", "o_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    base = ours(x).detach()
    pk = {"r": 0, **knobs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft.get_peft_model(theirs, peft.OFTConfig(target_modules=names, **pk))
        att = ll.attach(ours, ll.LoraLiteConfig(variant="oft", target_names=[rf"\.{n}$" for n in names], **pk))
    assert len(att) == 8
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    torch.testing.assert_close(ours(x), base, atol=0, rtol=0)  # identity at init, bit for bit
    torch.testing.assert_close(theirs(x), base, atol=0, rtol=0)
    with torch.no_grad():
        for t in att.targets:
            peft_r = theirs.get_submodule("base_model.model." + t.name).oft_R["default"].weight
            assert peft_r.shape == t.layer.lora_R.shape
            t.layer.lora_R.normal_(std=0.05)
            peft_r.copy_(t.layer.lora_R)
    err = (ours(x) - theirs(x)).abs().max().item()
    assert err <= 1e-5, err
    assert (ours(x) - base).abs().max().item() > 1e-3  # the rotation did something
