"""GPT-2 (transformers Conv1D, weight stored (d_in, d_out)) from config: targeting,
PiSSA on the transposed weight, exact detach. Training and round trips of every variant
run in test_layers_matrix.py."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from .support.models import tiny_gpt2, token_batch

pytest.importorskip("transformers")


def test_default_targeting_finds_every_conv1d_with_its_features():
    model = tiny_gpt2()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2))
    got = {t.name: (t.d_in, t.d_out, tuple(sorted(t.roles))) for t in att.targets}
    d = model.config.n_embd
    expected = {}
    for i in range(model.config.n_layer):
        h = f"transformer.h.{i}"
        expected[f"{h}.attn.c_attn"] = (d, 3 * d, ("reader",))
        expected[f"{h}.attn.c_proj"] = (d, d, ("reader", "writer"))
        expected[f"{h}.mlp.c_fc"] = (d, 4 * d, ("reader",))
        expected[f"{h}.mlp.c_proj"] = (4 * d, d, ("writer",))
    assert got == expected
    for t in att.targets:
        assert t.layer.lora_A.shape == (2, t.d_in) and t.layer.lora_B.shape == (t.d_out, 2)


def test_pissa_splits_the_transposed_weight_and_detach_is_exact():
    model = tiny_gpt2()
    batch = token_batch()
    with torch.no_grad():
        base = model(**batch).logits
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc", "c_proj"))}
    cfg = ll.LoraLiteConfig(variant="pissa", r=4, alpha=8)
    att = ll.attach(model, cfg)
    scale = cfg.alpha / cfg.r
    for t in att.targets:
        w = originals[t.name].T  # (d_out, d_in)
        stored = t.layer.weight  # still (d_in, d_out)
        assert stored.shape == (t.d_in, t.d_out)
        delta = scale * t.layer.lora_B @ t.layer.lora_A
        torch.testing.assert_close(stored.T + delta, w, atol=1e-6, rtol=0)
        # the adapter holds the top-r singular triplets of W itself, not of W^T's layout
        s = torch.linalg.svdvals(w)[:4]
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], s, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (model(**batch).logits - base).abs().max() < 1e-5
    ll.detach(model)
    for name, w in originals.items():
        assert torch.equal(model.get_submodule(name).weight, w)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
