"""VeRA: the shared contract, shared projections, parity with PEFT."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


class TestVeRAConformance(VariantConformance):
    variant = "vera"


class TestVeRASavedProjectionConformance(VariantConformance):
    variant = "vera"
    config_kwargs = {"save_projection": True}


NAMES = ["q_proj", "v_proj", "kv_mix", "up_proj", "down_proj"]  # five shapes: 32->32, 32->16, 16->16, 32->64, 64->32


def _attach(model, **kw):
    kw.setdefault("target_names", [rf"\.{n}$" for n in NAMES])
    return ll.attach(model, ll.LoraLiteConfig(variant="vera", r=4, **kw))


def _randomise(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in att.targets:
            t.layer.lora_lambda_b.copy_(torch.randn(t.layer.lora_lambda_b.shape, generator=g))
            t.layer.lora_lambda_d.copy_(torch.randn(t.layer.lora_lambda_d.shape, generator=g))


def test_equation_matches_the_paper():
    torch.manual_seed(0)
    model = ToyTransformer()
    layer = model.layers[0].v_proj  # 32 -> 16: a slice of the (4, 64) / (64, 4) shared pair
    x = torch.randn(3, 32)
    y0 = layer(x)
    att = _attach(model)
    _randomise(att)
    a, b = layer.lora_vera_A[:, :32], layer.lora_vera_B[:16]
    expected = y0 + layer.lora_lambda_b * ((layer.lora_lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_projections_are_one_shared_tensor_sized_by_the_widest_target():
    model = ToyTransformer()
    att = _attach(model)
    a, b = att.targets[0].layer.lora_vera_A, att.targets[0].layer.lora_vera_B
    assert a.shape == (4, 64) and b.shape == (64, 4) and not a.requires_grad and not b.requires_grad
    assert all(t.layer.lora_vera_A is a and t.layer.lora_vera_B is b for t in att.targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 + t.d_out for t in att.targets)
    model.double()  # a dtype/device move keeps one shared copy
    assert len({t.layer.lora_vera_A.data_ptr() for t in att.targets}) == 1
    assert att.targets[-1].layer.lora_vera_A.dtype == torch.float64


def test_projections_regenerate_from_the_seed():
    a1 = _attach(ToyTransformer(), projection_prng_key=3).targets[0].layer.lora_vera_A
    a2 = _attach(ToyTransformer(), projection_prng_key=3).targets[0].layer.lora_vera_A
    a3 = _attach(ToyTransformer(), projection_prng_key=4).targets[0].layer.lora_vera_A
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    bound = (6 / 64) ** 0.5  # PEFT's kaiming bound, fan_in = d_in_max
    assert a1.abs().max() <= bound and a1.abs().max() > 0.9 * bound


@pytest.mark.parametrize("save_projection", [False, True])
def test_checkpoint_holds_projections_only_when_asked(tmp_path, save_projection):
    model = ToyTransformer()
    att = _attach(model, save_projection=save_projection, projection_prng_key=5)
    _randomise(att)
    x = torch.randn(2, 3, 32)
    out = model(x)
    path = ll.save(model, tmp_path / "v.safetensors")
    records, tensors = ll.read_checkpoint(path)
    assert any(k.endswith("lora_vera_A") for k in tensors) == save_projection
    assert sum(k.endswith("lora_lambda_b") for k in tensors) == len(att)
    fresh = ToyTransformer()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, path)
    assert torch.equal(fresh(x), out)


def test_d_initial_zero_is_refused():
    with pytest.raises(ll.ConfigError, match="d_initial"):
        ll.LoraLiteConfig(variant="vera", d_initial=0.0)


def test_lambda_d_stays_fp32_under_bf16_storage():
    att = _attach(ToyTransformer(), dtype=torch.bfloat16)
    layer = att.targets[0].layer
    assert layer.lora_lambda_d.dtype == torch.float32 and layer.lora_vera_A.dtype == torch.bfloat16


def test_parity_with_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ToyTransformer(), ToyTransformer()
    theirs.load_state_dict(ours.state_dict())
    theirs = peft.get_peft_model(theirs, peft.VeraConfig(r=4, target_modules=NAMES, projection_prng_key=7))
    att = _attach(ours, projection_prng_key=7)
    assert len(att) == 10
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_peft == sum(p.numel() for p in att.trainable_parameters())
    # same key -> PEFT's very matrices, and the same init of the vectors
    assert torch.equal(att.targets[0].layer.lora_vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(att.targets[0].layer.lora_vera_B, theirs.base_model.vera_B["default"])
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        assert torch.equal(t.layer.lora_lambda_d, p.vera_lambda_d["default"])
        assert torch.equal(t.layer.lora_lambda_b, p.vera_lambda_b["default"])
    _randomise(att)
    with torch.no_grad():
        for t in att.targets:
            p = theirs.get_submodule("base_model.model." + t.name)
            p.vera_lambda_d["default"].copy_(t.layer.lora_lambda_d)
            p.vera_lambda_b["default"].copy_(t.layer.lora_lambda_b)
    x = torch.randn(2, 5, 32)
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - out_theirs).abs().max() <= 1e-5
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for t in att.targets:
        p = theirs.get_submodule("base_model.model." + t.name)
        torch.testing.assert_close(t.layer.lora_lambda_d.grad, p.vera_lambda_d["default"].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t.layer.lora_lambda_b.grad, p.vera_lambda_b["default"].grad, atol=1e-5, rtol=1e-4)
