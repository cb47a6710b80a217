"""LoRA-GA: the shared contract, the paper's gradient-SVD init in float64, identity, knobs, PEFT parity."""

import copy

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestLoRAGAConformance(VariantConformance):
    variant = "lora_ga"


def _loss(model, x):
    return model(x).float().pow(2).mean()


def test_init_follows_the_papers_equations_in_float64():
    """A0 = V[:, :r]^T, B0 = U[:, r:2r] S[r:2r] d_out^(1/4) / sqrt(gamma) of the exact gradient (up to signs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(5, 8)
    ref = copy.deepcopy(model).double()
    _loss(ref, x.double()).backward()
    r = 2
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_ga", r=r, alpha=4, stable_gamma=4.0), calibration_data=[x])
    for t, ref_layer in zip(att.targets, (ref[0], ref[2])):
        u, s, vh = torch.linalg.svd(ref_layer.weight.grad)  # q = min(4r, 8) = 8: the randomised SVD is exact
        a0, b0 = t.layer.lora_A0.double(), t.layer.lora_B0.double()
        signs_a = torch.sign((a0 * vh[:r]).sum(1, keepdim=True))
        torch.testing.assert_close(a0, signs_a * vh[:r], atol=1e-5, rtol=0)
        expected_b = u[:, r:2 * r] * s[r:2 * r] * (8 ** 0.25 / 4.0 ** 0.5)
        signs_b = torch.sign((b0 * expected_b).sum(0, keepdim=True))
        torch.testing.assert_close(b0, signs_b * expected_b, atol=1e-5, rtol=1e-4)
        assert torch.equal(t.layer.lora_A, t.layer.lora_A0) and torch.equal(t.layer.lora_B, t.layer.lora_B0)


def test_gradient_capture_equals_autograd_averaged_over_batches():
    from lora_lite_lora_ga import weight_gradients

    torch.manual_seed(0)
    model = ToyTransformer()
    ref = copy.deepcopy(model)
    batches = [torch.randn(2, 3, 32), torch.randn(3, 2, 32)]
    for b in batches:
        _loss(ref, b).backward()
    targets = ll.find_targets(model, ll.LoraLiteConfig(variant="lora_ga", r=2))
    grads = weight_gradients(model, targets, batches)
    for t in targets:
        torch.testing.assert_close(grads[t.name], ref.get_submodule(t.name).weight.grad / 2, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_identity_is_exact_and_base_untouched():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    base, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora_ga", r=4), calibration_data=[x])
    assert torch.equal(model(x), base)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(t.layer.lora_A.abs().sum() > 0 and t.layer.lora_B.abs().sum() > 0 for t in att.targets)
    assert sum(p.numel() for p in att.trainable_parameters()) == sum(4 * (t.d_in + t.d_out) for t in att.targets)


def test_batches_of_each_kind_give_a_loss():
    from lora_lite_lora_ga import _batch_loss

    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 3, 32)
    assert _batch_loss(model, (x, torch.zeros(2, 3, 48))).item() > 0
    assert _batch_loss(model, (x, torch.randint(0, 48, (2, 3)))).item() > 0
    with pytest.raises(ll.CalibrationError, match="batch is a str"):
        _batch_loss(model, "text")


def test_needs_data_and_refuses_bad_knobs():
    with pytest.raises(ll.CalibrationError, match="needs data"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="lora_ga", r=4))
    with pytest.raises(ll.ConfigError, match="2r=18"):
        ll.attach(ToyTransformer(), ll.LoraLiteConfig(variant="lora_ga", r=9), calibration_data=[torch.randn(1, 2, 32)])
    with pytest.raises(ll.ConfigError, match="stable_gamma"):
        ll.LoraLiteConfig(variant="lora_ga", stable_gamma=0.0)
    with pytest.raises(ll.ConfigError, match="niter"):
        ll.LoraLiteConfig(variant="lora_ga", niter=-1)
    with pytest.raises(ll.ConfigError, match="direction"):
        ll.LoraLiteConfig(variant="lora_ga", direction="BA")


NAMES = ["q_proj", "kv_mix", "down_proj"]


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("ArBr", "unit"), ("A2rBr", "gd_scale"),
                                              ("random", "weight_svd")])
def test_init_and_parity_with_peft(monkeypatch, direction, scale):
    peft = pytest.importorskip("peft")
    real = torch.svd_lowrank

    def seeded(*a, **k):  # PEFT draws from the global RNG; ours from a per-layer seed: give both the same
        torch.manual_seed(0)
        return real(*a, **k)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, 32)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=NAMES, init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale, stable_gamma=16))

    def train_step():
        _loss(theirs, x).backward()

    peft.preprocess_loraga(theirs, pcfg, train_step)
    theirs = peft.get_peft_model(theirs, pcfg)
    att = ll.attach(ours, ll.LoraLiteConfig(variant="lora_ga", r=4, alpha=8, direction=direction, scale=scale,
                                            target_names=[rf"\.{n}$" for n in NAMES]), calibration_data=[x])
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
