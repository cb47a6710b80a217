"""ParamSpec.materialize: each named init, and kaiming bit-identical to torch's."""

import math

import pytest
import torch
from torch import nn

import lora_lite as ll


@pytest.mark.parametrize("shape", [(8, 64), (3, 17), (16, 4096), (4, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kaiming_draws_what_nn_init_draws_for_the_same_seed(shape, dtype):
    torch.manual_seed(3)
    got = ll.ParamSpec(shape, init="kaiming").materialize(dtype, torch.device("cpu"))
    torch.manual_seed(3)
    want = torch.empty(shape, dtype=dtype)
    nn.init.kaiming_uniform_(want, a=math.sqrt(5))
    assert got.dtype == dtype and torch.equal(got.data, want)


def test_named_inits_and_flags():
    cpu = torch.device("cpu")
    z = ll.ParamSpec((2, 3)).materialize(torch.bfloat16, cpu)
    assert z.dtype == torch.bfloat16 and z.requires_grad and not z.any()
    o = ll.ParamSpec((4,), init="ones", keep_fp32=True, trainable=False).materialize(torch.bfloat16, cpu)
    assert o.dtype == torch.float32 and not o.requires_grad and torch.equal(o.data, torch.ones(4))
    c = ll.ParamSpec((3,), init=0.25).materialize(torch.float32, cpu)
    assert torch.equal(c.data, torch.full((3,), 0.25))
    f = ll.ParamSpec((2, 2), init=lambda t: t.copy_(torch.eye(2))).materialize(torch.float32, cpu)
    assert torch.equal(f.data, torch.eye(2))
    assert ll.ParamSpec((0, 5), init="kaiming").materialize(torch.float32, cpu).shape == (0, 5)


def test_kaiming_on_a_vector_is_refused_when_declared():
    with pytest.raises(ll.PluginError, match="at least 2 dimensions"):
        ll.ParamSpec((8,), init="kaiming")
