"""LoRA on nn.Embedding (tied or not) and nn.Conv1d/nn.Conv2d, targeted by name: parity with
PEFT's layers given the same tensors, training, exact save/load, merge; variants that do not
declare these kinds are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll

from .support.models import tiny_qwen3, token_batch


class ConvNet(nn.Module):
    def __init__(self, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=dilation, dilation=dilation)
        self.seq = nn.Conv1d(8, 4, 5, padding=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.conv(x))))
        h = self.seq(h.flatten(2))
        return self.head(h.mean(-1))


def _fill(att, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_conv_lora_matches_peft_and_trains_saves_reloads_merges(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = ConvNet().eval(), ConvNet().eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    base = ours(x).detach()
    att = ll.attach(ours, ll.LoraLiteConfig(variant="lora", r=2, alpha=4, target_names=(r"^conv$", r"^mid$", r"^seq$")))
    assert [ll.kind_name(t.layer) for t in att.targets] == ["torch-conv2d", "torch-conv2d", "torch-conv1d"]
    assert torch.equal(ours(x), base)  # identity at init
    _fill(att)
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "mid", "seq"]))
    with torch.no_grad():
        for t in att.targets:
            layer = pm.base_model.model.get_submodule(t.name)
            layer.lora_A["default"].weight.copy_(t.layer.lora_A)
            layer.lora_B["default"].weight.copy_(t.layer.lora_B)
    torch.testing.assert_close(ours(x), pm(x), atol=1e-5, rtol=1e-5)

    opt = torch.optim.AdamW(att.trainable_parameters(), lr=1e-2)
    target = torch.randn(2, 5)
    losses = []
    for _ in range(15):
        loss = (ours(x) - target).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    trained = ours(x).detach()
    fresh = ConvNet()
    fresh.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, ll.save(ours, tmp_path / "conv.safetensors"))
    assert torch.equal(fresh.eval()(x), trained)
    ll.merge(ours)
    torch.testing.assert_close(ours(x), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_lora_matches_peft_trains_reloads_and_merge_respects_tied_weights(tmp_path, tied):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    ours, theirs = tiny_qwen3(tie_word_embeddings=tied), tiny_qwen3(tie_word_embeddings=tied)
    batch = token_batch()
    with torch.no_grad():
        base = ours(**batch).logits
    cfg = ll.LoraLiteConfig(variant="lora", r=4, alpha=8, target_names=(r"embed_tokens$",), exclude_names=())
    att = ll.attach(ours, cfg)
    (t,) = att.targets
    assert ll.kind_name(t.layer) == "embedding" and t.d_in == 128 and t.d_out == 32
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, base)
    _fill(att)
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    layer = pm.base_model.model.model.embed_tokens
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(t.layer.lora_A)
        layer.lora_embedding_B["default"].copy_(t.layer.lora_B)
        torch.testing.assert_close(ours(**batch).logits, pm(**batch).logits, atol=1e-5, rtol=1e-5)
        adapted = ours(**batch).logits
    if tied:  # the lm_head shares the table: merging the embedding's adapter would change it too
        with pytest.raises(ll.MergeError, match="shared with .*lm_head.*tied"):
            ll.merge(ours)
    else:
        ll.merge(ours)
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
        ll.unmerge(ours)
    fresh = tiny_qwen3(tie_word_embeddings=tied)
    ll.load(fresh, ll.save(ours, tmp_path / "emb.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, adapted)


def test_dilated_conv_lora_is_exact_through_merge():
    """PEFT's conv LoRA builds lora_A without the layer's dilation (its output then has another
    shape); here A convolves exactly like the layer, so the delta is W + s B A on the kernels."""
    torch.manual_seed(0)
    model = ConvNet(dilation=2).eval()
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_names=(r"^mid$",)))
    _fill(att)
    x = torch.randn(2, 3, 16, 16)
    hooked = model(x).detach()
    ll.merge(model)
    torch.testing.assert_close(model(x), hooked, atol=1e-5, rtol=1e-5)


def test_embedding_and_conv_need_a_name_and_a_variant_that_supports_them():
    pytest.importorskip("transformers")
    model = tiny_qwen3()
    with pytest.raises(ll.TargetingError, match="exclude_names=\\(\\) to target them"):
        ll.attach(model, ll.LoraLiteConfig(variant="lora", target_names=(r"embed_tokens$",)))
    with pytest.raises(ll.TargetingError, match=r"supports the layer kinds \['linear-like'\].*'embedding' layer"):
        ll.attach(model, ll.LoraLiteConfig(variant="dora", target_names=(r"embed_tokens$",), exclude_names=()))
    att = ll.attach(model, ll.LoraLiteConfig(variant="lora"))  # roles never pick embeddings or convs
    assert all(ll.kind_name(t.layer) == "linear" for t in att.targets)
    assert not ll.attachments(ConvNet()) and len(ll.attach(ConvNet(), ll.LoraLiteConfig(variant="lora"))) == 1
