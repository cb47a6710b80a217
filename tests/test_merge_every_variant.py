"""Every installed variant merges: merged forward equals the hooked forward, unmerge puts
the storage back bit for bit, merge_and_unload leaves a plain model; on nn.Linear (toy and
Qwen3 architecture) and GPT-2's Conv1D. The adapters are perturbed away from identity first,
so a merge that ignored them would fail."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer

from .kit_settings import KIT_SETTINGS, calibration_for
from .models import tiny_gpt2, tiny_qwen3, token_batch

VARIANTS = [v.name for v in ll.list_variants()]
MODELS = {
    "toy": (lambda: ToyTransformer().eval(), lambda m: torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)),
            lambda m, b: m(b)),
    "qwen3": (tiny_qwen3, lambda m: token_batch(), lambda m, b: m(**b).logits),
    "gpt2": (tiny_gpt2, lambda m: token_batch(), lambda m, b: m(**b).logits),
}


def _perturb(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.trainable_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.add_(noise * 0.1 * (p.detach().float().abs().mean() + 0.1).to(p.dtype))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_hooked_unmerge_is_exact_unload_is_clean(variant, arch):
    if arch != "toy":
        pytest.importorskip("transformers")
    make, make_batch, run = MODELS[arch]
    torch.manual_seed(0)
    model = make()
    batch = make_batch(model)
    knobs = KIT_SETTINGS.get(variant, {}).get("config_kwargs", {})
    cfg = ll.LoraLiteConfig(**{"variant": variant, "r": 4, "alpha": 8, **knobs})
    att = ll.attach(model, cfg, calibration_data=calibration_for(variant, batch))
    _perturb(att)
    with torch.no_grad():
        hooked = run(model, batch)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ll.merge(model)
        merged = run(model, batch)
    assert (hooked - run(make(), batch)).abs().max() > 1e-4, "the perturbed adapter does nothing: the test is void"
    scale = hooked.abs().max().item()
    err = (merged - hooked).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0), f"merged differs from hooked by {err:.3g}"
    ll.unmerge(model)
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items()), "unmerge not exact"
    with torch.no_grad():
        assert torch.equal(run(model, batch), hooked)
    ll.merge_and_unload(model)
    assert not any(".lora_" in k for k in model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(model, batch), merged, atol=1e-5 * max(scale, 1.0), rtol=0)
