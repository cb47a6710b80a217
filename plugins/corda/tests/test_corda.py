"""CorDA: the shared contract, the covariance-oriented SVD in float64, identity, knobs, PEFT parity."""

import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestCorDAConformance(VariantConformance):
    variant = "corda"
    train_lr = 1e-3  # the factors carry the top of W's spectrum: 1e-2 overshoots on bnb-quantized Qwen3


def _reference(w, xs, r, method):
    """The paper's decomposition in float64: W C' = U S Vh, V = (Vh C'^-1)^T; the chosen rank-r part of W."""
    cov = sum((x.reshape(-1, x.shape[-1]).double() / x.max().abs()).T @ (x.reshape(-1, x.shape[-1]).double() / x.max().abs())
              for x in xs) / len(xs)
    fixed = cov + 0.01 * cov.diag().mean() * torch.eye(cov.shape[0], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w.double() @ fixed, full_matrices=False)
    v = (vh @ torch.linalg.inv(fixed)).T
    keep = slice(0, r) if method == "ipm" else slice(-r, None)
    return u[:, keep] @ torch.diag(s[keep]) @ v[:, keep].T, u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_decomposition_matches_the_paper_in_float64(method):
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    xs = [torch.randn(1, 30, 12), torch.randn(1, 20, 12) + 0.5]
    att = ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="corda", r=3, alpha=6, corda_method=method),
                    calibration_data=xs)
    part, whole = _reference(layer.weight.detach(), xs, 3, method)
    torch.testing.assert_close(whole, layer.weight.double(), atol=1e-10, rtol=0)  # W = U S V^T exactly
    ours = 2.0 * layer.lora_B0.double() @ layer.lora_A0.double()
    torch.testing.assert_close(ours, part, atol=2e-5, rtol=1e-4)
    assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
    assert len(att) == 1


def test_identity_is_exact_and_base_untouched():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    att = ll.attach(model, ll.LoraLiteConfig(variant="corda", r=4), calibration_data=[x])
    assert torch.equal(model(x), base)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert sum(p.numel() for p in att.trainable_parameters()) == sum(4 * (t.d_in + t.d_out) for t in att.targets)


def test_needs_data_and_refuses_bad_knobs():
    with pytest.raises(ll.CalibrationError, match="needs data"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="corda", r=4))
    with pytest.raises(ll.ConfigError, match="r=17"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="corda", r=17), calibration_data=[torch.randn(1, 2, 32)])
    with pytest.raises(ll.ConfigError, match="corda_method"):
        ll.LoraLiteConfig(variant="corda", corda_method="svd")
    with pytest.raises(ll.CalibrationError, match="batch is a str"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="corda", r=4), calibration_data=["text"])


NAMES = ["q_proj", "kv_mix", "down_proj"]


@pytest.mark.parametrize("method, r", [("ipm", 4), ("kpm", 4), ("ipm", 8)])
def test_init_and_parity_with_peft(monkeypatch, method, r):
    peft = pytest.importorskip("peft")
    try:
        import attr  # noqa: F401  (PEFT 0.21's corda.py imports attrs' dataclass, not a PEFT dependency)
    except ImportError:
        monkeypatch.setitem(sys.modules, "attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    xs = [torch.randn(1, 24, 32) for _ in range(3)]  # PEFT squeezes a batch of one: (tokens, d_in) per call
    pcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=NAMES, init_lora_weights="corda",
                           corda_config=CordaConfig(corda_method=method))
    preprocess_corda(theirs, pcfg, run_model=lambda: [theirs(x) for x in xs])
    theirs = peft.get_peft_model(theirs, pcfg)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="corda", r=r, alpha=2 * r, corda_method=method,
                                            target_names=[rf"\.{n}$" for n in NAMES]), calibration_data=xs)
    assert len(att) == 6
    for t in att.targets:
        mod = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_A, mod.lora_A["default"].weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t.layer.lora_B, mod.lora_B["default"].weight, atol=1e-5, rtol=1e-4)
    x2 = torch.randn(2, 5, 32)
    err = (ours(x2) - theirs(x2)).abs().max().item()
    assert err <= 1e-5, err
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained state: the same new A, B on both sides
        for t in att.targets:
            mod = theirs.get_submodule("base_model.model." + t.name)
            for mine, peer in ((t.layer.lora_A, mod.lora_A["default"].weight), (t.layer.lora_B, mod.lora_B["default"].weight)):
                mine.add_(0.05 * torch.randn(mine.shape, generator=g))
                peer.copy_(mine)
    err = (ours(x2) - theirs(x2)).abs().max().item()
    assert err <= 1e-5, err
