import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.targeting import block_index, find_targets


def names(model, **kw):
    return [t.name for t in find_targets(model, ll.LoraLiteConfig(variant="t_lora", **kw))]


def test_roles_by_shape(model):
    targets = {t.name: t.roles for t in find_targets(model, ll.LoraLiteConfig(variant="t_lora"))}
    assert targets["layers.0.q_proj"] == {"reader", "writer"}
    assert targets["layers.0.k_proj"] == {"reader"}
    assert targets["layers.0.o_proj"] == {"writer"}
    assert targets["layers.0.kv_mix"] == {"inner"}
    assert "lm_head" not in targets


def test_filters(model):
    assert names(model, target_roles=("inner",)) == ["layers.0.kv_mix", "layers.1.kv_mix"]
    assert names(model, target_names=(r"q_proj$", r"v_proj$"), layers=(1,)) == ["layers.1.q_proj", "layers.1.v_proj"]
    assert "layers.0.up_proj" not in names(model, exclude_names=("up_proj", "lm_head"))
    assert names(model, target_names=("lm_head",), exclude_names=()) == ["lm_head"]


def test_block_index():
    assert block_index("model.layers.12.self_attn.q_proj") == 12
    assert block_index("transformer.h.3.attn.c_attn") == 3
    assert block_index("encoder.block.0.layer.1.DenseReluDense.wi") == 0
    assert block_index("lm_head") is None


def test_no_match_lists_the_linear_modules(model):
    with pytest.raises(ll.TargetingError) as err:
        names(model, target_names=("nothing_like_this",))
    msg = str(err.value)
    assert "layers.0.q_proj: Linear(32 -> 32)" in msg and "target_names" in msg


def test_model_without_linears():
    with pytest.raises(ll.TargetingError, match="no linear-like"):
        ll.attach(nn.Sequential(nn.ReLU()), ll.LoraLiteConfig(variant="t_lora"))


def test_structural_detection_of_foreign_linear_like():
    class Foreign(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 8
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.weight.T

    model = nn.Sequential(Foreign())
    att = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    assert att.target_names == ["0"]


def test_multihead_attention_out_proj_is_refused_not_silently_dead():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with pytest.raises(ll.TargetingError, match=r"self_attn.out_proj.*exclude_names=\[r'out_proj\$'\]"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    assert not ll.attachments(model)
    att = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2, exclude_names=[r"out_proj$"]))
    assert att.target_names == ["linear1", "linear2"]
    # the hooks of what was targeted do run: moving B changes the output
    x = torch.randn(2, 3, 16)
    model.eval()
    before = model(x)
    with torch.no_grad():
        model.linear2.lora_B.normal_()  # not a constant: the LayerNorm after it would remove a uniform shift
    assert not torch.allclose(model(x), before)
