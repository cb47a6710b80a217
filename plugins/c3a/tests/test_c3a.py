"""C3A: the shared contract, the paper's circular convolution (float64), block-size fallback, PEFT parity."""

import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestC3AConformance(VariantConformance):
    variant = "c3a"
    # the toy's widths are 16, 32, 64: PEFT's block_size 256 divides none; 8 divides all
    config_kwargs = {"block_size": 8}
    train_lr = 1e-1  # the update is scaled by 1 / d_in: lr 1e-2 moves it too little in 20 steps


NAMES = ["q_proj", "v_proj", "kv_mix", "up_proj", "down_proj"]  # 32->32, 32->16, 16->16, 32->64, 64->32


def _attach(model, **kw):
    kw = {"target_names": [rf"\.{n}$" for n in NAMES], "block_size": 8, **kw}
    return ll.attach(model, ll.LoraLiteConfig(variant="c3a", **kw))


def _randomise(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_kernel.copy_(torch.randn(t.layer.lora_kernel.shape, generator=g))


def _conv_reference(x, kernel, d_out):
    """float64, block by block: out_i[t] = sum_j sum_s w[i, j, (s - t) mod b] x_j[s], / d_in."""
    m, n, b = kernel.shape
    xs = x.reshape(*x.shape[:-1], n, b)
    out = torch.zeros(*x.shape[:-1], m, b, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            for t in range(b):
                for s in range(b):
                    out[..., i, t] += kernel[i, j, (s - t) % b] * xs[..., j, s]
    return out.reshape(*x.shape[:-1], d_out) / x.shape[-1]


@pytest.mark.parametrize("name", ["v_proj", "up_proj"])
def test_equation_matches_the_paper(name):
    torch.manual_seed(0)
    model = ToyTransformer()
    layer = getattr(model.layers[0], name)
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    att = _attach(model)
    _randomise(att)
    expected = x @ layer.weight.double().T + layer.bias.double() + _conv_reference(x, layer.lora_kernel.double(), layer.out_features)
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_fft_form_agrees():
    """The circulant matrix equals the convolution theorem's form: ifft(fft(w) * fft(x)) with w reversed."""
    w = torch.randn(2, 3, 8, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    from lora_lite_c3a import circulant

    xs = x.reshape(5, 3, 8)
    wr = torch.roll(torch.flip(w, dims=[-1]), 1, dims=-1)  # w[-k mod b]: correlation as convolution
    via_fft = torch.fft.ifft(torch.einsum("xnb,mnb->xmb", torch.fft.fft(xs), torch.fft.fft(wr))).real.reshape(5, 16)
    torch.testing.assert_close(x @ circulant(w).T, via_fft)


def test_init_is_zero_kernel_in_fp32():
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base = model(x)
    att = _attach(model, dtype=torch.bfloat16)
    assert torch.equal(model(x), base)
    layer = model.layers[0].down_proj  # 64 -> 32, b = 8
    assert layer.lora_kernel.shape == (4, 8, 8) and layer.lora_kernel.dtype == torch.float32
    assert sum(p.numel() for p in att.trainable_parameters()) == sum(t.d_in * t.d_out // 8 for t in att.targets)


def test_block_size_that_does_not_divide_falls_back_to_the_gcd():
    layer = torch.nn.Linear(12, 18)
    with pytest.warns(UserWarning, match="does not divide d_in=12"):
        ll.attach(torch.nn.Sequential(layer), ll.LoraLiteConfig(variant="c3a", block_size=8))
    assert layer.lora_kernel.shape == (9, 6, 2)  # gcd(8, 12, 18) = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _attach(ToyTransformer(), block_size=16)  # divides every width: no warning


def test_knobs_are_validated():
    with pytest.raises(ll.ConfigError, match="block_size"):
        ll.LoraLiteConfig(variant="c3a", block_size=0)


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.C3AConfig(block_size=8, target_modules=NAMES, init_weights=True))
    att = _attach(ours)
    assert len(att) == 10
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(
        p.numel() for p in att.trainable_parameters()
    )
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        assert torch.equal(t.layer.lora_kernel, p.c3a_kernel["default"])  # zeros (PEFT's init_weights=True), same shape
    _randomise(att)
    with torch.no_grad():
        for t in att.targets:
            theirs.get_submodule("base_model.model." + t.name).c3a_kernel["default"].copy_(t.layer.lora_kernel)
    x = torch.randn(2, 5, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    err = (out_ours - out_theirs).abs().max().item()
    assert err <= 1e-5, err
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        w, _ = ll.get_variant("c3a").hook("merge")(t.layer, t.layer.weight.detach(), None)
        torch.testing.assert_close(w, t.layer.weight + p.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_kernel_gradient_matches_peft_and_input_gradient_is_exact():
    """Kernel gradients equal PEFT's on one layer. PEFT 0.21's hand-written backward returns a
    wrong *input* gradient (torch.autograd.gradcheck fails on BlockCircularConvolution), so in a
    stack of C3A layers the upstream kernels' gradients differ from PEFT's; ours is autograd's
    through a GEMM, checked here by gradcheck."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = torch.nn.Sequential(torch.nn.Linear(32, 16)), torch.nn.Sequential(torch.nn.Linear(32, 16))
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.C3AConfig(block_size=8, target_modules=["0"], init_weights=True))
    ll.attach(ours, ll.LoraLiteConfig(variant="c3a", block_size=8))
    with torch.no_grad():
        ours[0].lora_kernel.normal_()
        theirs.get_submodule("base_model.model.0").c3a_kernel["default"].copy_(ours[0].lora_kernel)
    x = torch.randn(4, 32)
    ours(x).square().mean().backward()
    theirs(x).square().mean().backward()
    g_ours, g_theirs = ours[0].lora_kernel.grad, theirs.get_submodule("base_model.model.0").c3a_kernel["default"].grad
    assert (g_ours - g_theirs).abs().max() <= 1e-5 * g_theirs.abs().max()
    layer = torch.nn.Linear(24, 16).double()
    ll.attach(torch.nn.Sequential(layer), ll.LoraLiteConfig(variant="c3a", block_size=8, dtype=torch.float64))
    with torch.no_grad():
        layer.lora_kernel.data = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(layer, (torch.randn(3, 24, dtype=torch.float64, requires_grad=True),))
