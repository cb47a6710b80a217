"""Every installed variant through the conformance kit on a Qwen3-architecture causal LM
built from config (each plugin's own tests run the kit on the toy model)."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import VariantConformance

from .kit_settings import KIT_SETTINGS
from .models import tiny_qwen3, token_batch

VARIANTS = [v.name for v in ll.list_variants()]


def kit_for(variant: str, base: type = VariantConformance) -> VariantConformance:
    settings = KIT_SETTINGS.get(variant, {})
    kit = type(f"Kit_{variant}", (base,), {"variant": variant, **settings})()
    return kit


class Qwen3Kit(VariantConformance):
    def make_model(self):
        return tiny_qwen3(self.seed)

    def make_batch(self, model):
        return token_batch(model.config.vocab_size)

    def run_model(self, model, batch):
        return model(**batch).logits


def test_the_three_foundation_variants_are_installed():
    assert {"lora", "pissa", "delora"} <= set(VARIANTS)


QWEN_CHECKS = [
    "test_identity_at_init", "test_hooks_are_live", "test_only_adapter_tensors_get_gradients",
    "test_loss_drops", "test_save_load_into_fresh_model_is_exact", "test_save_detach_load_same_model_is_exact",
    "test_detach_restores_outputs_and_requires_grad", "test_every_trainable_tensor_moves",
]


@pytest.mark.parametrize("check", QWEN_CHECKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_qwen3(variant, check, tmp_path):
    pytest.importorskip("transformers")
    kit = kit_for(variant, Qwen3Kit)
    fn = getattr(kit, check)
    fn(tmp_path) if "tmp_path" in fn.__code__.co_varnames else fn()


def test_quickstart_verbatim(tmp_path):
    """The original README's quickstart, word for word (plus a model and a loop)."""
    from lora_lite.testing import ToyTransformer

    import lora_lite as ll  # noqa: F811  (as the README writes it)

    model = ToyTransformer()
    cfg = ll.LoraLiteConfig(variant="lora", r=8, alpha=16, dtype=torch.bfloat16)
    handles = ll.attach(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    x = torch.randn(2, 4, 32)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(x).detach()
    ll.save(model, tmp_path / "adapter.pt")
    ll.detach(model)
    ll.load(model, tmp_path / "adapter.pt")
    assert len(handles) == 14
    assert torch.equal(model(x), out)
    A = model.layers[1].q_proj.lora_A
    assert isinstance(A, torch.nn.Parameter)
