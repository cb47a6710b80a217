"""Real bitsandbytes layers on CPU inside transformers models: DeLoRA reads dequantized
weights, PiSSA refuses or (opt-in) requantizes honestly, and transformers'
BitsAndBytesConfig loading works with lora-lite."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite import checks
from lora_lite.testing import parametrize_with_checks

from .support.kits import kit_for
from .support.layer_support import KINDS, LayerKindKit, make_model, same_state
from .support.models import BNB_WIDE, bnb_qwen3, tiny_qwen3, token_batch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

BNB = ["bnb-nf4", "bnb-fp4", "bnb-int8"]


def _targets_with_fp_weights(setting):
    return tiny_qwen3(**BNB_WIDE), bnb_qwen3(setting)


@pytest.mark.parametrize("setting", BNB)
def test_delora_weight_norms_are_those_of_the_dequantized_weight(setting):
    fp, model = _targets_with_fp_weights(setting)
    att = ll.attach(model, ll.LoraLiteConfig(variant="delora", r=4, lambda0=1.0))
    assert len(att.targets) == 14
    for t in att.targets:
        assert ll.layer_kind(t.layer).quantized
        deq = ll.dense_weight(t.layer).float()
        torch.testing.assert_close(t.layer.lora_w_norm, deq.norm(dim=0), atol=1e-6, rtol=1e-6)
        real = fp.get_submodule(t.name).weight.detach()
        # | ||deq_j|| - ||w_j|| | <= ||deq_j - w_j||: off the real norms by at most the quantization error
        gap = (t.layer.lora_w_norm - real.norm(dim=0)).abs()
        assert (gap <= (deq - real).norm(dim=0) * (1 + 1e-5) + 1e-7).all()
        assert gap.max() < 0.2 * real.norm(dim=0).min()
        # what the original DeLoRA computed from storage (packed codes / int8 without scales) is far off
        raw = t.layer.weight.detach().float()
        storage_norms = raw.norm(dim=0) if raw.shape[-1] == t.d_in else raw.norm().expand(t.d_in)
        ratio = (storage_norms / t.layer.lora_w_norm).nan_to_num(1e9)
        assert (ratio > 20).all() or (ratio < 0.05).all(), f"{t.name}: storage norms are not distinguishable"


def test_pissa_refuses_quantized_layers_by_default_and_says_what_to_do():
    model = bnb_qwen3("bnb-nf4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.WeightAccessError, match="quantized='requantize'.*dequantize|dequantize.*quantized='requantize'"):
        ll.attach(model, ll.LoraLiteConfig(variant="pissa", r=4))
    assert not ll.attachments(model) and same_state(model, before)


@pytest.mark.parametrize("setting", BNB)
def test_pissa_requantize_reports_its_identity_error_and_detach_restores_the_storage(setting, tmp_path):
    fp, model = tiny_qwen3(**BNB_WIDE), bnb_qwen3(setting)
    batch = token_batch()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    dequantized = {n: ll.dense_weight(m).float().clone() for n, m in model.named_modules() if ll.layer_kind(m) and n != "lm_head"}
    with torch.no_grad():
        base, full = model(**batch).logits, fp(**batch).logits
    cfg = ll.LoraLiteConfig(variant="pissa", r=4, alpha=8, quantized="requantize")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        att = ll.attach(model, cfg)
    assert any("W_res requantized" in str(w.message) and "lora_requant_error" in str(w.message) for w in caught)
    scale = cfg.alpha / cfg.r
    for t in att.targets:
        w = dequantized[t.name]
        res = ll.dense_weight(t.layer).float()
        adapted = res + scale * t.layer.lora_B @ t.layer.lora_A
        err = (adapted - w).abs().max() / w.abs().max()
        # the reported error is the measured one, and it is a real (non-zero) requantization error
        assert t.layer.lora_requant_error == pytest.approx(float(err), rel=1e-5)
        assert 1e-5 < err < 0.25
    with torch.no_grad():
        out = model(**batch).logits
    identity, quantization = (out - base).abs().max().item(), (base - full).abs().max().item()
    assert 1e-5 < identity <= 2 * quantization, (identity, quantization)
    # detach puts the ORIGINAL quantized storage back, byte for byte
    path = ll.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        trained = model(**batch).logits
    ll.detach(model)
    assert same_state(model, original)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
    ll.load(model, path)  # re-runs the same SVD and requantization: exact
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained)


@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    tiny_qwen3().save_pretrained(path)
    return path


class HFQuantizedKit(LayerKindKit):
    """The conformance kit on a model transformers quantized with BitsAndBytesConfig on CPU."""

    path = None
    quantization = None

    def make_model(self):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(**self.quantization)
        # training mode (dropout is 0): see quantize_linear on bnb's eval-mode CPU repacking
        return AutoModelForCausalLM.from_pretrained(
            self.path, quantization_config=q, device_map="cpu", dtype=torch.float32
        ).train()


HF_QUANT = {
    "4bit-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "8bit": {"load_in_8bit": True},
}
HF_CHECKS = (checks.check_identity_at_init, checks.check_loss_drops, checks.check_save_load_into_fresh_model_is_exact,
             checks.check_save_detach_load_same_model_is_exact, checks.check_gradients_finite_and_nonzero)


@pytest.mark.parametrize("quant", sorted(HF_QUANT))
@parametrize_with_checks(["lora", "delora"], HF_CHECKS)
def test_transformers_bitsandbytes_config_on_cpu(variant, quant, check, saved_qwen3, tmp_path):
    kit = kit_for(variant, HFQuantizedKit)
    kit.path, kit.quantization = saved_qwen3, HF_QUANT[quant]
    model = kit.make_model()
    kinds = {ll.layer_kind(t.layer).name for t in ll.find_targets(model, kit.make_config())}
    assert kinds == {"bnb-4bit" if quant.startswith("4bit") else "bnb-8bit"}
    check(kit.subject(tmp_path))


def test_matrix_models_are_really_quantized():
    expected = {"bnb-nf4": ("Linear4bit", torch.bfloat16), "bnb-fp4": ("Linear4bit", torch.uint8),
                "bnb-int8": ("Linear8bitLt", torch.int8)}
    for kind, (_, setting) in KINDS.items():
        if setting in expected:
            layers = [m for m in make_model(kind).modules() if ll.layer_kind(m) and ll.is_quantized(m)]
            assert len(layers) == 14
            assert {(type(m).__name__, m.weight.dtype) for m in layers} == {expected[setting]}


def test_an_adapter_loads_after_bnb_repacked_the_model_for_cpu_inference(tmp_path):
    """bnb repacks 4-bit layers on the first inference forward on AVX512-BF16 CPUs (and
    rounds their block scales to bf16); the base-weight fingerprint must not change."""
    model = bnb_qwen3("bnb-nf4")
    ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2))
    path = ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    # bnb can repack only layers with in_features >= 64 and out_features % 32 == 0: all of the widened model's
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features >= 64]
    assert len(layers) == 14
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # bnb's own path, whatever this CPU is
        layer.eval()
    with torch.no_grad():
        model(**token_batch())
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    (att,) = ll.load(model, path)
    assert len(att.targets) == 14
