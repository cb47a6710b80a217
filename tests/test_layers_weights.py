"""Dense weight access on real bitsandbytes layers (CPU) and transformers Conv1D:
dequantized numbers, never storage; exact undo of every write; pluggable kinds."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import plugins, weights

from .support.layer_support import same_bits

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")


def _linear(d_in=64, d_out=32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _linear4bit(lin, quant_type, storage):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                          quant_type=quant_type, quant_storage=storage)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def _linear8bit(lin, has_fp16_weights=False):
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=has_fp16_weights)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_reads_the_dequantized_weight_for_every_storage(quant_type, storage):
    lin = _linear()
    q = _linear4bit(lin, quant_type, storage)
    assert q.weight.dtype == storage and q.weight.shape[1] == 1  # packed codes, not a (32, 64) weight
    w = ll.dense_weight(q)
    assert w.shape == (32, 64) and w.dtype == torch.float32
    assert torch.equal(w, F.dequantize_4bit(q.weight.data, q.weight.quant_state))
    # within the 4-bit quantization error of the real weight (absmax blocks of 64)
    err = (w - lin.weight).abs().max().item()
    assert 1e-4 < err < 0.2 * lin.weight.abs().max().item()
    # the forward computes with exactly this weight
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), nn.functional.linear(x, w, q.bias), atol=1e-5, rtol=1e-5)
    assert ll.layer_kind(q).name == "bnb-4bit" and ll.is_quantized(q)


@pytest.mark.parametrize("nested", [True, False])
def test_4bit_reads_bnbs_cpu_packed_inference_layout(nested):
    """On AVX512-BF16 CPUs bnb repacks 4-bit weights in place on the first eval forward
    and computes with bf16 block scales. Its kernel needs that CPU, so the read is checked
    against the packed state itself: exact scales, layer untouched, fingerprint unchanged."""
    lin = _linear(64, 64)
    q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu").eval()
    unpacked = ll.dense_weight(q).clone()
    fingerprint = weights.weight_fingerprint_tensor(q).clone()
    q.support_avx512bf16_for_cpu = True  # take bnb's own packing path whatever this CPU is
    with torch.no_grad():
        q(torch.randn(3, 64))
    state = q.weight.quant_state
    assert state.packing_format_for_cpu and q.weight.shape == (64, 32) and state.absmax.dtype == torch.bfloat16
    storage = q.weight.data.clone()
    w = ll.dense_weight(q)
    assert w.shape == (64, 64) and w.dtype == torch.float32
    # same codes, and each block's scale is the bf16 one the packed kernel computes with
    assert torch.equal(w, fingerprint)
    assert 0 < (w - unpacked).abs().max() <= 2**-8 * unpacked.abs().max()
    assert torch.equal(weights.weight_fingerprint_tensor(q), fingerprint), "repacking changed the fingerprint"
    assert torch.equal(q.weight.data, storage) and q.weight.quant_state.packing_format_for_cpu, "read mutated the layer"


def test_8bit_reads_codes_times_scales_before_and_after_the_first_forward():
    lin = _linear()
    q = _linear8bit(lin)
    assert q.weight.dtype == torch.int8 and q.weight.SCB is not None and q.state.SCB is None
    before = ll.dense_weight(q)
    expected = q.weight.data.float() * q.weight.SCB[:, None] / 127
    torch.testing.assert_close(before, expected, atol=1e-7, rtol=0)
    assert (before - lin.weight).abs().max() < lin.weight.abs().max() / 127
    x = torch.randn(3, 64)
    y = q(x)  # bnb moves codes and scales from the weight to layer.state here
    assert q.weight.SCB is None and q.state.SCB is not None
    after = ll.dense_weight(q)
    assert torch.equal(before, after)
    torch.testing.assert_close(y, nn.functional.linear(x, after, q.bias), atol=1e-5, rtol=1e-5)


def test_8bit_with_fp16_master_weights_reads_the_master_weight():
    lin = _linear()
    q = _linear8bit(lin, has_fp16_weights=True)
    assert torch.equal(ll.dense_weight(q), lin.weight) and type(ll.dense_weight(q)) is torch.Tensor


def test_unquantized_bnb_layers_are_refused_not_read():
    lin = _linear()
    q4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    q4.load_state_dict(lin.state_dict())
    q8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    q8.load_state_dict(lin.state_dict())
    for q in (q4, q8):
        with pytest.raises(ll.WeightAccessError, match="not quantized yet.*quantize the model"):
            ll.dense_weight(q)


def test_8bit_codes_without_scales_are_refused():
    q = _linear8bit(_linear())
    q.weight.SCB = None
    with pytest.raises(ll.WeightAccessError, match="without their scales"):
        ll.dense_weight(q)


def test_storage_that_looks_like_a_weight_is_never_read_as_one():
    """A float32-storage 4-bit layer whose storage is reshaped to (out, in) is still bnb, not linear."""
    q = _linear4bit(_linear(8, 64), "nf4", torch.float32)
    assert q.weight.numel() == 64 * 8 // 8  # 8 codes per float32
    fake = nn.Linear(8, 64)
    fake.weight = bnb.nn.Params4bit(torch.zeros(64, 8), requires_grad=False, quant_type="nf4")
    fake.weight.bnb_quantized = True  # a Params4bit with a weight-shaped payload but no quant_state
    assert ll.layer_kind(fake) is None, "a Params4bit payload matched a float kind"
    with pytest.raises(ll.WeightAccessError, match="no registered layer kind"):
        ll.dense_weight(fake)


@pytest.mark.parametrize("make", [
    lambda lin: _linear4bit(lin, "nf4", torch.bfloat16),
    lambda lin: _linear4bit(lin, "fp4", torch.uint8),
    lambda lin: _linear8bit(lin),
], ids=["nf4-bf16", "fp4-uint8", "int8"])
@pytest.mark.parametrize("forward_first", [False, True])
def test_requantizing_write_and_exact_undo(make, forward_first):
    lin = _linear()
    q = make(lin)
    x = torch.randn(3, 64)
    if forward_first:
        q(x)
    storage = {k: v.clone() for k, v in q.state_dict().items()}
    y0 = q(x)
    new = torch.randn(32, 64) * 0.05
    with pytest.raises(ll.WeightAccessError, match="requantize=True"):
        ll.replace_dense_weight(q, new)
    ll.replace_dense_weight(q, new, requantize=True)
    got = ll.dense_weight(q)
    assert (got - new).abs().max() < 0.2 * new.abs().max(), "the written weight was not requantized from `new`"
    torch.testing.assert_close(q(x), nn.functional.linear(x, got, q.bias), atol=1e-5, rtol=1e-5)
    ll.replace_dense_weight(q, torch.zeros(32, 64), requantize=True)  # a second write keeps the first undo
    weights.restore_dense_weight(q)
    now = q.state_dict()
    assert set(now) == set(storage) and all(same_bits(now[k], v) for k, v in storage.items())
    assert torch.equal(q(x), y0)


def test_conv1d_is_a_layer_kind_with_transposed_storage():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    c = Conv1D(nf=48, nx=16)
    assert ll.layer_kind(c).name == "conv1d" and not ll.is_quantized(c)
    assert weights.features(c) == (16, 48)
    w = ll.dense_weight(c)
    assert w.shape == (48, 16) and torch.equal(w, c.weight.T)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(c(x), nn.functional.linear(x, w, c.bias))
    original = c.weight.data
    new = torch.randn(48, 16)
    ll.replace_dense_weight(c, new)
    assert torch.equal(c.weight, new.T) and c.weight.shape == (16, 48)
    weights.restore_dense_weight(c)
    assert c.weight.data_ptr() == original.data_ptr() and torch.equal(c.weight, original)


def test_write_shape_is_checked():
    lin = _linear()
    with pytest.raises(ll.WeightAccessError, match="shape"):
        ll.replace_dense_weight(lin, torch.zeros(64, 32))


def test_core_does_not_import_bitsandbytes_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys, torch, lora_lite as ll\n"
        "ll.dense_weight(torch.nn.Linear(4, 3)); ll.list_variants()\n"
        "print(sorted(m for m in ('bitsandbytes', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- third-party layer kinds --------------------------------------------------------------

class ScaledInt8(nn.Module):
    """A toy quantized layer: int8 codes and one scale per output row."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().amax(dim=1) / 127
        self.weight = nn.Parameter(torch.round(lin.weight.detach() / scale[:, None]).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale[:, None])


SCALED_INT8 = ll.LayerKind(
    name="toy-int8",
    matches=lambda layer: isinstance(layer, ScaledInt8),
    features=lambda layer: (layer.in_features, layer.out_features),
    read=lambda layer: layer.weight.float() * layer.scale[:, None],
    quantized=True,
)


def test_a_registered_kind_serves_weight_reading_variants():
    """A storage lora-lite does not ship (scaled int8) becomes readable by registering its
    kind in process (a distribution adding one calls register_layer_kind on import)."""
    ll.register_layer_kind(SCALED_INT8)
    try:
        assert [k.name for k in ll.layer_kinds()][0] == "toy-int8"
        torch.manual_seed(0)
        lin = nn.Linear(16, 8)
        model = nn.Sequential(ScaledInt8(lin))
        torch.testing.assert_close(ll.dense_weight(model[0]), lin.weight, atol=lin.weight.abs().max().item() / 127, rtol=0)
        att = ll.attach(model, ll.LoraLiteConfig(variant="delora", r=2, lambda0=1.0))
        torch.testing.assert_close(model[0].lora_w_norm, ll.dense_weight(model[0]).norm(dim=0))
        att.detach()
        with pytest.raises(ll.WeightAccessError, match="pissa"):
            ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=2))
    finally:
        ll.unregister_layer_kind("toy-int8")


def test_register_layer_kind_in_process():
    lin = nn.Linear(16, 8)
    layer = ScaledInt8(lin)
    with pytest.raises(ll.WeightAccessError, match="no registered layer kind"):
        ll.dense_weight(layer)
    ll.register_layer_kind(SCALED_INT8)
    try:
        assert ll.layer_kind(layer) is SCALED_INT8
        with pytest.raises(ll.WeightAccessError, match="already registered"):
            ll.register_layer_kind(SCALED_INT8)
        with pytest.raises(ll.WeightAccessError, match="cannot take a new dense weight"):
            ll.replace_dense_weight(layer, torch.zeros(8, 16), requantize=True)
    finally:
        ll.unregister_layer_kind("toy-int8")
    assert ll.layer_kind(layer) is None
