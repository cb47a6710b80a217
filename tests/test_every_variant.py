"""Every installed variant through the conformance kit on a Qwen3-architecture causal LM
built from config (each plugin's own tests run the kit on the toy model)."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite import checks
from lora_lite.testing import parametrize_with_checks

from .support.kits import Qwen3Models, kit_for

VARIANTS = [v.name for v in ll.list_variants()]


def test_the_three_foundation_variants_are_installed():
    assert {"lora", "pissa", "delora"} <= set(VARIANTS)


QWEN_CHECKS = (
    checks.check_identity_at_init, checks.check_hooks_are_live, checks.check_only_adapter_tensors_get_gradients,
    checks.check_loss_drops, checks.check_save_load_into_fresh_model_is_exact,
    checks.check_save_detach_load_same_model_is_exact, checks.check_detach_restores_outputs_and_requires_grad,
    checks.check_every_trainable_tensor_moves, checks.check_stacking_set_active_and_save_load,
    checks.check_mixed_batch_rows,
)


@parametrize_with_checks(VARIANTS, QWEN_CHECKS)
def test_qwen3(variant, check, tmp_path):
    """Each plugin's own kit (its settings found in its tests), moved onto Qwen3 from config."""
    pytest.importorskip("transformers")
    check(kit_for(variant, Qwen3Models).subject(tmp_path))


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
