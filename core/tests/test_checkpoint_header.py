"""A safetensors header length whose low byte is 0x80 (the pickle opcode) or spells "PK"
(zip) must not be mistaken for a pickle: found by `lora-lite probe` on delora."""

import struct

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import ToyTransformer


def _save(pad: int, path):
    torch.manual_seed(0)
    model = ToyTransformer()
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2, exclude_names=("^" + "z" * pad + "$",)))
    ll.save(model, path)
    return model, struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("signature", [b"\x80", b"PK"])
def test_safetensors_header_length_that_looks_like_a_pickle_loads(signature, x, tmp_path):
    path = tmp_path / "a.safetensors"
    _, base_len = _save(0, path)
    low = int.from_bytes(signature, "little")  # the header length's low byte(s) to hit
    modulus = 256 ** len(signature)
    wanted = base_len + (low - base_len) % modulus
    for pad in range(max(0, wanted - base_len - 16), wanted - base_len + 17):
        model, length = _save(pad, path)
        if length % modulus == low:
            break
    else:
        pytest.fail(f"no padding gave a header length ending in {signature!r}")
    assert path.read_bytes().startswith(signature)
    with torch.no_grad():
        out = model(x)
    torch.manual_seed(0)
    fresh = ToyTransformer()
    ll.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
