"""BOFT: the shared contract, the butterfly equations in float64, PEFT's layout and parity."""

import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestBOFTConformance(VariantConformance):
    variant = "boft"  # PEFT's defaults: blocks of 4, one factor (the kit's r=4 is unused)


class TestBOFTButterflyConformance(VariantConformance):
    variant = "boft"
    config_kwargs = {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3}


def _perm_matrix(idx):
    p = torch.zeros(len(idx), len(idx), dtype=torch.float64)
    p[torch.arange(len(idx)), idx] = 1.0
    return p


def _reference_perm(n, groups, half):
    """The butterfly permutation written out from its definition, loop by loop."""
    out, group = [], n // groups
    for g in range(groups):
        chunks = list(range(0, group // half, 2)) + list(range(1, group // half, 2))
        out += [g * group + c * half + j for c in chunks for j in range(half)]
    return torch.tensor(out)


def _one_layer(d_in=16, d_out=6, **knobs):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="boft", **knobs))
    with torch.no_grad():
        layer.lora_R.normal_(std=0.2)
        layer.lora_s.normal_(mean=1.0, std=0.2)
    return layer


@pytest.mark.parametrize(
    "knobs",
    [{}, {"boft_block_size": 2, "boft_n_butterfly_factor": 3}, {"boft_block_size": 0, "boft_block_num": 4,
                                                               "boft_n_butterfly_factor": 2}],
)
def test_butterfly_product_of_cayley_blocks_float64(knobs):
    layer = _one_layer(**knobs)
    raw = layer.lora_R.detach().double()
    m, num, size, _ = raw.shape
    eye = torch.eye(size, dtype=torch.float64)
    rot = torch.eye(16, dtype=torch.float64)
    for i in range(m):  # B = M_{m-1} ... M_0, M_i = P_i D_i P_i^T
        blocks = []
        for k in range(num):
            q = (raw[i, k] - raw[i, k].T) / 2
            blocks.append((eye - q) @ torch.linalg.inv(eye + q))
            torch.testing.assert_close(blocks[-1].T @ blocks[-1], eye, atol=1e-12, rtol=0)
        p = _perm_matrix(_reference_perm(16, num // 2**i, size // 2)) if m > 1 else torch.eye(16, dtype=torch.float64)
        rot = p @ torch.block_diag(*blocks) @ p.T @ rot
    x = torch.randn(5, 16, dtype=torch.float64)
    w, b, s = layer.weight.double(), layer.bias.double(), layer.lora_s.detach().double().view(-1)
    expected = s * ((x @ rot) @ w.T) + b
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_identity_at_init_is_exact_and_gradients_flow():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    base = layer(x).detach()
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="boft", boft_n_butterfly_factor=2))
    assert layer.lora_R.shape == (2, 4, 4, 4) and layer.lora_s.shape == (8, 1)
    assert layer.lora_s.dtype == torch.float32
    assert torch.equal(layer(x), base)
    layer(x).pow(2).sum().backward()
    g = layer.lora_R.grad
    assert g.abs().sum() > 0 and layer.lora_s.grad.abs().sum() > 0
    torch.testing.assert_close(g, -g.transpose(-1, -2))  # only the skew part of R acts


def test_knobs_are_validated():
    for knobs, match in [
        ({"boft_block_num": 4}, "exactly one"), ({"boft_block_size": 0}, "exactly one"),
        ({"boft_block_size": -4, "boft_block_num": 0}, "exactly one"), ({"boft_n_butterfly_factor": 0}, ">= 1"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.LoraLiteConfig(variant="boft", **knobs)
    for d_in, knobs, match in [
        (10, {}, "not divisible by boft_block_size=4"),
        (16, {"boft_block_size": 0, "boft_block_num": 3}, "not divisible by boft_block_num"),
        (24, {"boft_n_butterfly_factor": 4}, "2\\^\\(boft_n_butterfly_factor - 1\\)"),
        (12, {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2}, "even"),
        (8, {"boft_block_size": 0, "boft_block_num": 8}, "size 1"),
    ]:
        model = nn.Sequential(nn.Linear(d_in, 4))
        with pytest.raises(ll.ConfigError, match=match):
            ll.attach(model, ll.LoraLiteConfig(variant="boft", **knobs))
        assert not ll.attachments(model)


def test_permutations_equal_pefts():
    pytest.importorskip("peft")
    from peft.tuners.boft.layer import BOFTLayer
    from lora_lite_boft import butterfly_perm

    for d_in, num, size, m in [(32, 8, 4, 3), (64, 16, 4, 4), (48, 6, 8, 2), (64, 4, 16, 3)]:
        for i in range(m):
            theirs = BOFTLayer.block_butterfly_perm(None, d_in, num // 2**i, size // 2, m - 1)
            assert torch.equal(butterfly_perm(d_in, num, size, i), theirs)
            assert torch.equal(_reference_perm(d_in, num // 2**i, size // 2), theirs)


def test_backward_keeps_one_activation_copy_per_factor():
    layer = nn.Linear(64, 64)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="boft", boft_block_size=8, boft_n_butterfly_factor=2))
    rotate = ll.get_variant("boft").hook("forward_input")

    def saved_numel(tokens):
        saved = []
        x = torch.randn(tokens, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            rotate(layer, x)
        return sum(saved)

    assert (saved_numel(300) - saved_numel(100)) / 200 == 2 * 64  # one input copy per factor's bmm


class _BlockDiagExtension:
    """A pure-torch stand-in for PEFT's ``fbd_cuda`` extension (block_diag per factor), so PEFT
    computes butterfly factors > 1 on CPU instead of silently falling back to one factor."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"boft_block_size": 8},
        {"boft_block_size": 4, "boft_n_butterfly_factor": 2},
        {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
        {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2},
    ],
)
def test_parity_with_peft(knobs, monkeypatch):
    peft = pytest.importorskip("peft")
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiagExtension)
    names = ["q_proj", "kv_mix", "o_proj", "down_proj"]
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32)
    base = ours(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft.get_peft_model(theirs, peft.BOFTConfig(target_modules=names, **knobs))
        att = ll.attach(ours, ll.LoraLiteConfig(variant="boft", target_names=[rf"\.{n}$" for n in names], **knobs))
    assert len(att) == 8
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    torch.testing.assert_close(ours(x), base, atol=0, rtol=0)  # identity at init, bit for bit
    torch.testing.assert_close(theirs(x), base, atol=1e-6, rtol=0)
    with torch.no_grad():
        for t in att.targets:
            mod = theirs.get_submodule("base_model.model." + t.name)
            assert mod.boft_R["default"].shape == t.layer.lora_R.shape
            assert mod.boft_s["default"].shape == t.layer.lora_s.shape
            t.layer.lora_R.normal_(std=0.1)
            t.layer.lora_s.normal_(mean=1.0, std=0.1)
            mod.boft_R["default"].copy_(t.layer.lora_R)
            mod.boft_s["default"].copy_(t.layer.lora_s)
    err = (ours(x) - theirs(x)).abs().max().item()
    print(f"boft parity {knobs}: {err:.3g}")
    assert err <= 1e-5, err
    assert (ours(x) - base).abs().max().item() > 1e-3  # the adapter did something
    # PEFT's merge agrees with ours
    ll.merge(ours)
    theirs.merge_adapter()
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
