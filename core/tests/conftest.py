"""Core tests use in-process variants only, so they pass with no plugin installed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import lora_lite as ll


@dataclass
class ScaleConfig(ll.LoraLiteConfig):
    variant: str = "t_scale"
    start: float = 1.0


class ToyLoRA:
    """Minimal additive variant: y + B A x (B zeros)."""

    name = "t_lora"

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"), "lora_B": ll.ParamSpec((d_out, cfg.r))}

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        return y + F.linear(F.linear(x, layer.lora_A.to(x.dtype)), layer.lora_B.to(x.dtype))


class ToyInputScale:
    """Pre-hook variant with a typed knob: x * g, g = start (fp32)."""

    name = "t_scale"
    config_class = ScaleConfig

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, cfg):  # a subset of the spec's arguments is allowed
        return {"lora_g": ll.ParamSpec((d_in,), init=cfg.start, keep_fp32=True)}

    @staticmethod
    @ll.hookimpl
    def forward_input(layer, x):
        return x * layer.lora_g.to(x.dtype)


@pytest.fixture(autouse=True)
def toy_variants():
    ll.register(ToyLoRA)
    ll.register(ToyInputScale)
    yield
    for name in ("t_lora", "t_scale"):
        try:
            ll.unregister(name)
        except ll.UnknownVariantError:
            pass


@pytest.fixture
def model():
    from lora_lite.testing import ToyTransformer

    torch.manual_seed(0)
    return ToyTransformer()


@pytest.fixture
def x():
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
