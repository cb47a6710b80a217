"""Every installed variant merges: merged forward equals the hooked forward, unmerge puts
the storage back bit for bit, merge_and_unload leaves a plain model; on nn.Linear (toy and
Qwen3 architecture) and GPT-2's Conv1D. The adapters are perturbed away from identity first,
so a merge that ignored them would fail."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer

from .support.kits import calibration_for, config_kwargs
from .support.models import tiny_gpt2, tiny_qwen3, token_batch

VARIANTS = [v.name for v in ll.list_variants()]
MODELS = {
    "toy": (lambda: ToyTransformer().eval(), lambda m: torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)),
            lambda m, b: m(b)),
    "qwen3": (tiny_qwen3, lambda m: token_batch(), lambda m, b: m(**b).logits),
    "gpt2": (tiny_gpt2, lambda m: token_batch(), lambda m, b: m(**b).logits),
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (bnb packs 4-bit codes into bf16 storage, where some bytes read as NaN)."""
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


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
    knobs = config_kwargs(variant)
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


def test_save_merged_loads_with_plain_transformers_and_gives_the_adapted_logits(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("transformers")
    model = tiny_qwen3()
    att = ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4))
    _perturb(att)
    batch = token_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
    out = ll.save_merged(model, tmp_path / "merged")
    assert ll.attachments(model) and not ll.attachments(model)[0].hook_handles == []  # still hooked, unmerged
    torch.save({"batch": batch, "logits": adapted}, tmp_path / "expected.pt")
    script = (
        "import sys, torch; sys.modules['lora_lite'] = None  # lora-lite must not be needed\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad(): got = m(**e['batch']).logits\n"
        "print('MAXERR', (got - e['logits']).abs().max().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = float(proc.stdout.split("MAXERR")[1])
    assert err <= 1e-5, f"merged model's logits differ from the adapted ones by {err}"


def test_merge_into_bnb_is_refused_by_default_dequantize_is_exact_requantize_reports(tmp_path):
    pytest.importorskip("bitsandbytes")
    from .support.models import bnb_qwen3

    model = bnb_qwen3("bnb-nf4")
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    _perturb(att)
    batch = token_batch()
    with torch.no_grad():
        hooked = model(**batch).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.MergeError, match="dequantize=True.*requantize=True"):
        ll.merge(model)
    assert all(_same_bits(model.state_dict()[k], v) for k, v in before.items())
    assert ll.merge(model, dequantize=True) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hooked, atol=1e-4, rtol=0)
    ll.unmerge(model)
    after = model.state_dict()
    assert all(_same_bits(after[k], v) for k, v in before.items()), "unmerge of a dequantized merge is not exact"
    errors = ll.merge(model, requantize=True)
    assert len(errors) == 14 and 0 < max(errors.values()) < 0.5
    ll.unmerge(model)
    assert all(_same_bits(model.state_dict()[k], v) for k, v in before.items())


def test_cli_merge_writes_a_model_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_lite.tools.cli import main

    base_dir = tmp_path / "base"
    tiny_qwen3().save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    _perturb(att)
    batch = token_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
    ll.save(model, tmp_path / "adapter.safetensors")
    assert main(["merge", str(tmp_path / "adapter.safetensors"), str(tmp_path / "out"), "--model", str(base_dir)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any(".lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=0)
