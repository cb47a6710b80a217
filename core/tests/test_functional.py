"""ll.low_rank_update: the shared LoRA product, in both of its forms."""

import pytest
import torch

import lora_lite as ll


def _factors(dtype, d_in=12, d_out=10, r=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d_in, generator=g)
    a = torch.randn(r, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, r, generator=g).to(dtype)
    y = torch.randn(2, 5, d_out, generator=g)
    return x, a, b, y


def test_update_matches_the_equation_in_float64():
    x, a, b, y = (t.double() for t in _factors(torch.float64))
    want = 0.75 * (x @ a.T @ b.T)
    torch.testing.assert_close(ll.low_rank_update(x, a, b, 0.75), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ll.low_rank_update(x, a, b, 0.75, y), y + want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors_are_cast_to_the_activations_not_the_reverse(adapter_dtype):
    x, a, b, y = _factors(adapter_dtype)
    out = ll.low_rank_update(x, a, b, 2.0, y)
    assert out.dtype == torch.float32
    # the factors are upcast exactly; the activations stay fp32 (a bf16 round trip of x would be ~1e-2 off)
    want = y + 2.0 * (x @ a.float().T @ b.float().T)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert ll.low_rank_update(x, a, b, 2.0).dtype == torch.float32


def test_gradients_reach_both_factors_and_the_input_with_the_scale():
    x, a, b, y = (t.double() for t in _factors(torch.float64))
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    ll.low_rank_update(x, a, b, 0.5, y).sum().backward()
    ones = torch.ones_like(y)
    torch.testing.assert_close(b.grad, 0.5 * torch.einsum("bso,bsr->or", ones, x.detach() @ a.detach().T))
    assert a.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
