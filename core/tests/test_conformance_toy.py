"""The conformance kit itself, run on the in-process toy variants."""

from lora_lite.testing import VariantConformance


class TestToyLoRA(VariantConformance):
    variant = "t_lora"


class TestToyInputScale(VariantConformance):
    variant = "t_scale"
    config_kwargs = {"start": 1.0}
