"""FourierFT: the shared contract, the paper's equation in float64, positions, knobs, PEFT parity."""

import math

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance

# the toy model's smallest target is 16 x 16 = 256 entries: PEFT's default n_frequency=1000 does not
# fit; PEFT's scaling=150 suits 768-4096 wide layers (a coefficient moves an entry by scaling / (d_out d_in)),
# on 32-wide ones it overshoots at the kit's lr on Qwen3. The same as tests/kit_settings.py.
KNOBS = {"n_frequency": 64, "scaling": 30.0}


class TestFourierFTConformance(VariantConformance):
    variant = "fourierft"
    config_kwargs = KNOBS


class TestFourierFTSmallScalingConformance(VariantConformance):
    variant = "fourierft"
    config_kwargs = {"n_frequency": 200, "scaling": 20.0, "random_loc_seed": 3}


def _paper_delta(c, rows, cols, d_out, d_in, scaling):
    """dW[p, q] = scaling / (d_out d_in) * sum_k c_k cos(2 pi (j_k p / d_out + l_k q / d_in)), in float64."""
    p = torch.arange(d_out, dtype=torch.float64)[:, None, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows.double() * p / d_out + cols.double() * q / d_in)
    return scaling / (d_out * d_in) * (c.double() * torch.cos(phase)).sum(-1)


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    seq = nn.Sequential(layer)
    ll.attach(seq, ll.LoraLiteConfig(variant="fourierft", n_frequency=30, scaling=7.0))
    with torch.no_grad():
        layer.lora_spectrum.normal_()
    idx = layer.lora_index
    dw = _paper_delta(layer.lora_spectrum, idx // 12, idx % 12, 10, 12, 7.0)
    x = torch.randn(3, 12)
    expected = x.double() @ (layer.weight.double() + dw).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    # float64 inputs compute the update in float64
    ll.detach(seq)
    layer.double()
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="fourierft", n_frequency=30, scaling=7.0, dtype=torch.float64))
    with torch.no_grad():
        layer.lora_spectrum.normal_()
    dw = _paper_delta(layer.lora_spectrum, layer.lora_index // 12, layer.lora_index % 12, 10, 12, 7.0)
    xd = x.double()
    torch.testing.assert_close(layer(xd), xd @ (layer.weight + dw).T + layer.bias, atol=1e-12, rtol=1e-12)


def test_init_is_zero_and_positions_are_distinct_and_seeded():
    torch.manual_seed(0)
    a, b = ToyTransformer(), ToyTransformer()
    att = ll.attach(a, ll.LoraLiteConfig(variant="fourierft", n_frequency=100, random_loc_seed=5))
    ll.attach(b, ll.LoraLiteConfig(variant="fourierft", n_frequency=100, random_loc_seed=6))
    for t in att.targets:
        assert torch.equal(t.layer.lora_spectrum, torch.zeros(100))
        assert t.layer.lora_spectrum.dtype == torch.float32 and t.layer.lora_spectrum.requires_grad
        idx = t.layer.lora_index
        assert idx.dtype == torch.int64 and not idx.requires_grad
        assert idx.unique().numel() == 100 and 0 <= idx.min() and idx.max() < t.d_in * t.d_out
        # PEFT's draw: a seeded permutation of the flat positions, no global RNG involved
        expected = torch.randperm(t.d_in * t.d_out, generator=torch.Generator().manual_seed(5))[:100]
        assert torch.equal(idx, expected)
        assert not torch.equal(idx, b.get_submodule(t.name).lora_index)
    assert [n for n, p in a.named_parameters() if p.requires_grad] == [
        t.name + ".lora_spectrum" for t in att.targets
    ]


def test_positions_are_saved_and_reloaded_without_rng(tmp_path):
    torch.manual_seed(0)
    model = ToyTransformer()
    att = ll.attach(model, ll.LoraLiteConfig(variant="fourierft", **KNOBS))
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_spectrum.normal_()
            # positions that no seed draws: a reload must take them from the file
            t.layer.lora_index.copy_(t.layer.lora_index.flip(0) + 1)
    x = torch.randn(2, 5, 32)
    out = model(x)
    keys = ll.save(model, tmp_path / "a.safetensors")
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, keys)
    assert torch.equal(fresh(x), out)
    for t in att.targets:
        assert torch.equal(fresh.get_submodule(t.name).lora_index, t.layer.lora_index)


def test_bf16_activations_and_storage():
    torch.manual_seed(0)
    model = ToyTransformer().to(torch.bfloat16)
    att = ll.attach(model, ll.LoraLiteConfig(variant="fourierft", dtype=torch.bfloat16, **KNOBS))
    assert all(p.dtype == torch.float32 for p in att.trainable_parameters())  # the spectrum stays fp32
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    ({"n_frequency": 0}, "n_frequency"),
    ({"n_frequency": -3}, "n_frequency"),
    ({"scaling": 0.0}, "scaling"),
    ({"random_loc_seed": -1}, "random_loc_seed"),
    ({"n_frequency": 1.5}, "n_frequency"),
])
def test_bad_knobs_are_config_errors(kwargs, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant="fourierft", **kwargs)


def test_too_many_frequencies_for_a_layer_is_refused_untouched():
    model = ToyTransformer()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="exceeds"):
        ll.attach(model, ll.LoraLiteConfig(variant="fourierft", n_frequency=257))  # kv_mix is 16 x 16
    assert not ll.attachments(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def _peft_pair(names, n_frequency, scaling, seed):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    pcfg = peft.FourierFTConfig(n_frequency=n_frequency, scaling=scaling, random_loc_seed=seed,
                                target_modules=names, init_weights=True)
    theirs = peft.get_peft_model(theirs, pcfg)
    cfg = ll.LoraLiteConfig(variant="fourierft", n_frequency=n_frequency, scaling=scaling, random_loc_seed=seed,
                            target_names=[rf"\.{n}$" for n in names])
    return ours, theirs, ll.attach(ours, cfg)


@pytest.mark.parametrize("n_frequency, scaling, seed", [(64, 150.0, 777), (200, 300.0, 0), (17, 3.5, 12345)])
def test_parity_with_peft(n_frequency, scaling, seed):
    names = ["q_proj", "k_proj", "kv_mix", "down_proj"]
    ours, theirs, att = _peft_pair(names, n_frequency, scaling, seed)
    assert len(att) == 8
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    x = torch.randn(2, 5, 32)
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        # PEFT's (2, n) row/column positions are our flat positions, read row-major
        assert torch.equal(p.indices["default"][0] * t.d_in + p.indices["default"][1], t.layer.lora_index)
    base = ours(x)
    torch.testing.assert_close(base, theirs(x), atol=0, rtol=0)  # both the base model at init
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_spectrum.copy_(torch.randn(n_frequency, generator=g))
            theirs.get_submodule("base_model.model." + t.name).fourierft_spectrum["default"].copy_(t.layer.lora_spectrum)
    ref = theirs(x)
    assert (ref - base).abs().max() > 1e-2, "the copied spectrum does nothing: the test is void"
    # N(0, 1) coefficients (PEFT's init_weights=False draw) at scaling 300 move these 32-wide
    # outputs to ~60: 1e-5 is relative to the output's size (measured 4.8e-6, 4.4e-5 at |y| 58, 4.8e-7)
    err = (ours(x) - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err
    # merged weights agree with PEFT's get_delta_weight too
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        w, _ = ll.get_variant("fourierft").hook("merge")(t.layer, t.layer.weight.detach().float(), None)
        torch.testing.assert_close(w - t.layer.weight, p.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_gradient_matches_peft():
    names = ["q_proj", "up_proj"]
    ours, theirs, att = _peft_pair(names, 64, 150.0, 777)
    x = torch.randn(2, 5, 32)
    ours(x).pow(2).sum().backward()
    theirs(x).pow(2).sum().backward()
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name).fourierft_spectrum["default"]
        torch.testing.assert_close(t.layer.lora_spectrum.grad, p.grad, atol=1e-5, rtol=1e-5)
