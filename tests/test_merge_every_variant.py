"""Every installed variant merges: merged forward equals the hooked forward, unmerge puts
the storage back bit for bit, merge_and_unload leaves a plain model; on nn.Linear (toy and
Qwen3 architecture), GPT-2's Conv1D and bitsandbytes 4-bit/8-bit with ``dequantize=True``.
The adapters are perturbed away from identity first, so a merge that ignored them would
fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lora_lite as ll
from lora_lite import checks
from lora_lite.testing import parametrize_with_checks

from .support.kits import Qwen3Models, kit_for
from .support.models import bnb_qwen3, tiny_gpt2, tiny_qwen3, token_batch

VARIANTS = [v.name for v in ll.list_variants()]


class GPT2Models(Qwen3Models):
    """Kit mixin: GPT-2 from config (Conv1D layers, transposed storage)."""

    def make_model(self):
        return tiny_gpt2(self.seed)


def _bnb_kit(setting):
    class BnbModels(Qwen3Models):
        """Kit mixin: the widened Qwen3 with bitsandbytes layers, merged with dequantize=True."""

        merge_options = {"dequantize": True}

        def make_model(self):
            pytest.importorskip("bitsandbytes")
            return bnb_qwen3(setting, self.seed)

    return BnbModels


MODEL_KITS = {"toy": None, "qwen3": Qwen3Models, "gpt2": GPT2Models,
              "bnb-nf4": _bnb_kit("bnb-nf4"), "bnb-int8": _bnb_kit("bnb-int8")}


@pytest.mark.parametrize("arch", list(MODEL_KITS))
@parametrize_with_checks(VARIANTS, [checks.check_merge_equals_hooked])
def test_merge_equals_hooked_unmerge_is_exact_unload_is_clean(variant, check, arch, tmp_path):
    """The contract's merge check on the plugin's own kit (toy), Qwen3, GPT-2 and bnb
    (``dequantize=True``); every variant shipped here merges. A variant that refuses
    quantized layers at attach (typed, see docs/layers.md) is attached with its
    ``quantized="requantize"`` knob where it has one (PiSSA), else has nothing to merge there."""
    if arch != "toy":
        pytest.importorskip("transformers")
    subject = kit_for(variant, MODEL_KITS[arch]).subject(tmp_path)
    if arch.startswith("bnb"):
        try:
            subject.attach(subject.make_model())
        except (ll.WeightAccessError, ll.AttachError) as err:
            # a variant that rewrites the weight refuses quantized storage unless told to requantize
            if "quantized" not in {f.name for f in dataclasses.fields(subject.make_config())}:
                pytest.skip(f"{variant} refuses {arch} at attach: {type(err).__name__}")
            plain = subject.make_config
            subject = subject.with_(make_config=lambda **kw: plain(**{"quantized": "requantize", **kw}))
    assert check(subject)["mergeable"] == 1


def test_save_merged_loads_with_plain_transformers_and_gives_the_adapted_logits(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("transformers")
    model = tiny_qwen3()
    att = ll.attach(model, ll.LoraLiteConfig(variant="dora", r=4))
    checks.perturb_adapter(att, 0)
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
    checks.perturb_adapter(att, 0)
    batch = token_batch()
    with torch.no_grad():
        hooked = model(**batch).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.MergeError, match="dequantize=True.*requantize=True"):
        ll.merge(model)
    assert all(checks.same_bits(model.state_dict()[k], v) for k, v in before.items())
    assert ll.merge(model, dequantize=True) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hooked, atol=1e-4, rtol=0)
    ll.unmerge(model)
    after = model.state_dict()
    assert all(checks.same_bits(after[k], v) for k, v in before.items()), "unmerge of a dequantized merge is not exact"
    errors = ll.merge(model, requantize=True)
    assert len(errors) == 14 and 0 < max(errors.values()) < 0.5
    ll.unmerge(model)
    assert all(checks.same_bits(model.state_dict()[k], v) for k, v in before.items())


def test_cli_merge_writes_a_model_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_lite.tools.cli import main

    base_dir = tmp_path / "base"
    tiny_qwen3().save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=4))
    checks.perturb_adapter(att, 0)
    batch = token_batch()
    with torch.no_grad():
        adapted = model(**batch).logits
    ll.save(model, tmp_path / "adapter.safetensors")
    assert main(["merge", str(tmp_path / "adapter.safetensors"), str(tmp_path / "out"), "--model", str(base_dir)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any(".lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=0)
