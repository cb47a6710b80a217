"""EVA: the shared contract with calibration data, the principal components against an
independent centred SVD, loud calibration errors, and PEFT's EVA on the same data."""

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer, VariantConformance


def toy_batches(model, n=2, seed=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, model.d_model, generator=g) for _ in range(n)]


class TestEVAConformance(VariantConformance):
    variant = "eva"

    def calibration_data(self, model):
        return toy_batches(model)


def _inputs_of(model, name, batches):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(seen).double()


def test_A_is_the_top_r_principal_components_and_B_is_zero():
    model = ToyTransformer()
    batches = toy_batches(model, n=3)
    att = ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4), calibration_data=batches)
    tensors = {k: v.detach().clone() for k, v in att.adapter_tensors().items()}
    ll.detach(model)
    for t in att.targets:
        x = _inputs_of(model, t.name, batches)
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        assert s[3] > 1.001 * s[4], "test data without a spectral gap at r"
        ref = vh[:4].float()
        got = tensors[f"{t.name}.lora_A"]
        # each row is the reference component up to sign, and the sign rule holds
        torch.testing.assert_close(got.abs(), ref.abs(), atol=2e-5, rtol=0)
        assert bool((got.gather(1, got.abs().argmax(1, keepdim=True)) > 0).all())
        assert not tensors[f"{t.name}.lora_B"].any()


def test_batching_does_not_change_the_components():
    model = ToyTransformer()
    batches = toy_batches(model, n=3)
    a1 = ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4), calibration_data=batches)
    split = {k: v.clone() for k, v in a1.adapter_tensors().items()}
    ll.detach(model)
    a2 = ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4), calibration_data=torch.cat(batches))
    for k, v in a2.adapter_tensors().items():
        torch.testing.assert_close(v, split[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("data, match", [
    (None, "needs data"),
    ([], "empty list"),  # core checks emptiness before group_init
    ([torch.full((2, 6, 32), float("nan"))], "NaN or inf"),
    ([torch.randn(1, 3, 32)], "unmasked calibration tokens"),
    ([[1, 2, 3]], "pass dicts of model inputs"),
])
def test_bad_calibration_data_fails_loudly_and_leaves_the_model_untouched(data, match):
    model = ToyTransformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.CalibrationError, match=match):
        ll.attach(model, ll.LoraLiteConfig(variant="eva", r=4), calibration_data=data)
    assert not ll.attachments(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_components_match_peft_eva_on_the_same_data():
    """PEFT's EVA (rho=1: no rank redistribution) on the same single batch. PEFT runs a
    randomized SVD with q = 2r columns; with 2r >= d_in that range finder is exact, so
    PEFT's A is the exact centred PCA and must equal ours, signs included."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import get_eva_state_dict

    model = ToyTransformer()
    data = torch.cat(toy_batches(model, n=4))  # 96 tokens of width 32
    names = ["q_proj", "k_proj", "v_proj", "up_proj"]
    cfg = peft.LoraConfig(r=16, target_modules=names, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.0))
    theirs = get_eva_state_dict(model, [data], cfg, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    att = ll.attach(model, ll.LoraLiteConfig(variant="eva", r=16, target_names=[rf"\.{n}$" for n in names]),
                    calibration_data=[data])
    assert sorted(theirs) == sorted(att.target_names)
    for t in att.targets:
        err = (t.layer.lora_A - theirs[t.name]).abs().max().item()
        assert err <= 1e-4, f"{t.name}: max |A - A_peft| = {err:.2e}"


def test_calibration_restores_every_modules_own_train_mode():
    """A model may mix modes (bnb 8-bit layers compute differently in train and eval):
    calibration must give each module back its own mode, not just the root's."""
    from lora_lite.testing import ToyTransformer

    model = ToyTransformer().eval()
    model.layers[1].train()
    modes = {name: m.training for name, m in model.named_modules()}
    batch = torch.randn(2, 5, 32)
    ll.attach(model, ll.LoraLiteConfig(variant="eva", r=2), calibration_data=[batch])
    assert {name: m.training for name, m in model.named_modules()} == modes
