"""ETHER / ETHER+: the shared contract and the paper's hyperplane reflections, checked against an
independent float64 reference built from dense block-diagonal matrices (no PEFT implementation)."""

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import IDENTITY_ATOL, ToyTransformer, VariantConformance, _outputs


class TestETHERPlusConformance(VariantConformance):
    variant = "ether"  # default: ETHER+, input side, one block (the kit's r=4 is unused)


class TestETHERPlusTwoSidedConformance(VariantConformance):
    variant = "ether"
    config_kwargs = {"two_sided": True, "nb": 4}


class TestETHERPlusFlipSideConformance(VariantConformance):
    variant = "ether"
    config_kwargs = {"flip_side": True, "nb": 2}


class TestETHERReflectionConformance(VariantConformance):
    """Plain ETHER starts reflected, never at the identity (|H - I|_F = 2 for any u): the two
    identity checks are replaced by checks that the start is exactly the paper's reflection."""

    variant = "ether"
    config_kwargs = {"ether_plus": False, "nb": 4}

    def _check_start(self, dtype):
        model = self.make_model()
        batch = self.make_batch(model)
        base = _outputs(model, self.run_model, batch)
        att = self.attach(model, self.make_config(dtype=dtype))
        out = _outputs(model, self.run_model, batch)
        assert out.dtype == base.dtype
        assert (out - base).abs().max().item() > 1e-3, "plain ETHER should start reflected"
        for t in att.targets:
            h = ll.get_variant("ether").hook("forward_input")(t.layer, torch.eye(t.d_in))
            eye = torch.eye(t.d_in)
            torch.testing.assert_close(h @ h, eye, atol=1e-5, rtol=0)  # a reflection: H^2 = I
            dist = torch.linalg.matrix_norm(h - eye).item()
            assert abs(dist - 2 * 4**0.5) < 1e-4  # |H_k - I|_F = 2 in each of the 4 blocks

    def test_identity_at_init(self):
        self._check_start(torch.float32)

    def test_identity_with_bf16_adapter_storage(self):
        self._check_start(torch.bfloat16)


def dense_h(vecs, plus):
    """Block-diagonal H from (k, nb, b) vectors, straight from the paper's formulas, float64."""
    blocks = []
    for k in range(vecs.shape[1]):
        u = vecs[0, k].double()
        eye = torch.eye(len(u), dtype=torch.float64)
        if plus:
            v = vecs[1, k].double()
            blocks.append(eye - torch.outer(u, u) / u.dot(u) + torch.outer(v, v) / v.dot(v))
        else:
            blocks.append(eye - 2 * torch.outer(u, u) / u.dot(u))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize(
    "knobs",
    [{}, {"nb": 4}, {"ether_plus": False}, {"ether_plus": False, "nb": 2}, {"two_sided": True, "nb": 2},
     {"flip_side": True}, {"flip_side": True, "ether_plus": False, "nb": 3}],
)
def test_matches_dense_float64_reference(knobs):
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ether", **knobs))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.add_(torch.randn_like(p) * 0.3)  # split the ETHER+ pairs
    plus = knobs.get("ether_plus", True)
    w, b = layer.weight.double(), layer.bias.double()
    h_in = dense_h(layer.lora_in.detach(), plus) if hasattr(layer, "lora_in") else torch.eye(12, dtype=torch.float64)
    h_out = dense_h(layer.lora_out.detach(), plus) if hasattr(layer, "lora_out") else torch.eye(6, dtype=torch.float64)
    if not plus:
        torch.testing.assert_close(h_in @ h_in.T, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x @ (h_out @ w @ h_in).T + b  # W' = H' W H, bias untouched
    err = (layer(x.float()).double() - expected).abs().max().item()
    assert err <= 1e-5, err
    merged, mb = ll.get_variant("ether").hook("merge")(layer, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(merged.double(), h_out @ w @ h_in, atol=1e-5, rtol=1e-5)
    assert torch.equal(mb, layer.bias.detach())


def test_ether_plus_starts_at_the_identity_and_pairs_split():
    torch.manual_seed(0)
    model = ToyTransformer()
    x = torch.randn(2, 5, 32)
    base = model(x).detach()
    att = ll.attach(model, ll.LoraLiteConfig(variant="ether", two_sided=True, nb=2))
    err = (model(x) - base).abs().max().item()
    assert err <= IDENTITY_ATOL[torch.float32], err
    q = model.layers[0].q_proj
    assert q.lora_in.shape == (2, 2, 16) and q.lora_in.dtype == torch.float32
    assert torch.equal(q.lora_in[1], -q.lora_in[0])  # v = -u: v v^T = u u^T, the terms cancel
    bound = 1 / 16**0.5  # kaiming-uniform (a=sqrt(5)) on fan-in b = 16
    assert q.lora_in.abs().max() <= bound and q.lora_in.abs().max() > 0.8 * bound
    model(x).pow(2).mean().backward()
    g = q.lora_in.grad
    assert g.abs().sum() > 0 and not torch.allclose(g[0], -g[1])  # u and v move apart
    att.detach()


def test_knobs_are_validated():
    for knobs, match in [
        ({"nb": 0}, "nb"), ({"two_sided": True, "ether_plus": False}, "ether_plus=True"),
        ({"two_sided": True, "flip_side": True}, "redundant"),
    ]:
        with pytest.raises(ll.ConfigError, match=match):
            ll.LoraLiteConfig(variant="ether", **knobs)
    for d_in, d_out, knobs, match in [(10, 4, {"nb": 4}, "input width 10"), (8, 6, {"nb": 4, "two_sided": True},
                                                                              "output width 6"),
                                      (4, 4, {"nb": 4}, "size 1")]:
        model = nn.Sequential(nn.Linear(d_in, d_out))
        with pytest.raises(ll.ConfigError, match=match):
            ll.attach(model, ll.LoraLiteConfig(variant="ether", target_names=[r"^0$"], **knobs))
        assert not ll.attachments(model)


def test_backward_keeps_one_activation_copy():
    layer = nn.Linear(64, 64)
    ll.attach(nn.Sequential(layer), ll.LoraLiteConfig(variant="ether", nb=4))
    reflect = ll.get_variant("ether").hook("forward_input")

    def saved_numel(tokens):
        saved = []
        x = torch.randn(tokens, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            reflect(layer, x)
        return sum(saved)

    # x itself plus the 2-wide projection per block
    assert (saved_numel(300) - saved_numel(100)) / 200 == 64 + 2 * 4
