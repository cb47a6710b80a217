"""The layer-kind contract without any optional dependency: plain Linear, a quantized
kind's write guard, exact undo (also on a rolled-back attach), write's undo contract."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import weights


class Halves(nn.Module):
    """Toy quantized storage: the weight kept as fp16, read back as fp32."""

    def __init__(self, d_in=8, d_out=4):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.store = nn.Parameter(torch.randn(d_out, d_in).half(), requires_grad=False)
        self.weight = self.store

    def forward(self, x):
        return nn.functional.linear(x, self.store.float())


def _write(layer, w):
    old = layer.store.data
    layer.store.data = w.half()
    return lambda: setattr(layer.store, "data", old)


HALVES = ll.LayerKind("test-halves", lambda m: isinstance(m, Halves), lambda m: (m.in_features, m.out_features),
                      lambda m: m.store.float(), _write, quantized=True)


@pytest.fixture
def halves():
    ll.register_layer_kind(HALVES)
    yield Halves()
    ll.unregister_layer_kind(HALVES.name)


def test_plain_linear_reads_and_restores_exactly():
    lin = nn.Linear(8, 4)
    original = lin.weight.detach().clone()
    assert ll.layer_kind(lin).name == "linear" and not ll.is_quantized(lin)
    assert ll.dense_weight(lin) is lin.weight
    ll.replace_dense_weight(lin, torch.zeros(4, 8))
    ll.replace_dense_weight(lin, torch.ones(4, 8))  # the first undo wins
    assert torch.equal(lin.weight, torch.ones(4, 8))
    weights.restore_dense_weight(lin)
    assert torch.equal(lin.weight, original)
    weights.restore_dense_weight(lin)  # no-op once restored
    assert torch.equal(lin.weight, original)


def test_quantized_kinds_are_written_only_when_asked_to_requantize(halves):
    before = halves.store.detach().clone()
    with pytest.raises(ll.WeightAccessError, match="requantize=True"):
        ll.replace_dense_weight(halves, torch.zeros(4, 8))
    assert torch.equal(halves.store, before)
    ll.replace_dense_weight(halves, torch.full((4, 8), 1 / 3), requantize=True)
    assert ll.dense_weight(halves)[0, 0] == torch.tensor(1 / 3).half().float()
    weights.restore_dense_weight(halves)
    assert torch.equal(halves.store, before)


def test_a_rolled_back_attach_restores_a_rewritten_weight(halves):
    class RewritesThenFails:
        name = "t_rewrite_fail"

        @staticmethod
        @ll.hookimpl
        def param_specs(d_in, d_out, cfg):
            return {"lora_z": ll.ParamSpec((1,))}

        @staticmethod
        @ll.hookimpl
        def init(layer, cfg):
            ll.replace_dense_weight(layer, torch.zeros(4, 8), requantize=True)
            raise RuntimeError("boom")

        @staticmethod
        @ll.hookimpl
        def forward(layer, x, y):
            return y

    ll.register(RewritesThenFails)
    try:
        model = nn.Sequential(halves)
        before = halves.store.detach().clone()
        with pytest.raises(ll.AttachError, match="boom"):
            ll.attach(model, ll.LoraLiteConfig(variant="t_rewrite_fail", r=1))
        assert torch.equal(halves.store, before) and weights._UNDO_ATTR not in halves.__dict__
    finally:
        ll.unregister("t_rewrite_fail")


def test_write_must_return_an_undo(halves):
    bad = ll.LayerKind("test-bad-write", lambda m: isinstance(m, nn.Identity), lambda m: (2, 2),
                       lambda m: torch.zeros(2, 2), lambda m, w: None)
    ll.register_layer_kind(bad)
    try:
        with pytest.raises(ll.WeightAccessError, match="undo"):
            ll.replace_dense_weight(nn.Identity(), torch.zeros(2, 2))
    finally:
        ll.unregister_layer_kind("test-bad-write")


def test_register_layer_kind_rejects_non_kinds():
    with pytest.raises(ll.WeightAccessError, match="LayerKind"):
        ll.register_layer_kind(object())
    with pytest.raises(ll.WeightAccessError, match="no layer kind named"):
        ll.unregister_layer_kind("nope")
