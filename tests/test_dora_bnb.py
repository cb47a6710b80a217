"""DoRA on bitsandbytes layers: the magnitude and the per-call weight norm come from the
dequantized weight through lora_lite.dense_weight, never from packed storage."""

import pytest
import torch

import lora_lite as ll

pytest.importorskip("lora_lite_dora")
bnb = pytest.importorskip("bitsandbytes")


def _bnb_layer(bits, linear):
    if bits == 4:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")  # bitsandbytes quantizes on .to(device)


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_on_bnb_uses_the_dequantized_weight(bits):
    if not any(k.name == f"bnb-{bits}bit" for k in ll.weights.layer_kinds()):
        pytest.skip(f"this lora-lite-core has no bnb-{bits}bit layer kind")
    torch.manual_seed(0)
    q = _bnb_layer(bits, torch.nn.Linear(64, 48))
    x = torch.randn(5, 64)
    y0 = q(x).detach()
    # the weight the layer really applies, measured from its outputs (independent of lora-lite)
    w = (q(torch.eye(64)) - q.bias).T.detach()
    ll.attach(torch.nn.Sequential(q), ll.LoraLiteConfig(variant="dora", r=4, alpha=4))
    torch.testing.assert_close(q.lora_magnitude, w.norm(dim=1), atol=1e-5, rtol=1e-5)
    assert (q(x) - y0).abs().max() <= 1e-5
    with torch.no_grad():
        q.lora_B.normal_()
        q.lora_magnitude.mul_(1.1)
    v = w + q.lora_B @ q.lora_A
    expected = (q.lora_magnitude / v.norm(dim=1)) * (y0 - q.bias + x @ (q.lora_B @ q.lora_A).T) + q.bias
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)
