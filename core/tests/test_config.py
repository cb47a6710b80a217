import pytest
import torch

import lora_lite as ll


def test_defaults_and_original_api_shape():
    cfg = ll.LoraLiteConfig(variant="t_lora", r=8, alpha=16, dtype=torch.bfloat16)
    assert (cfg.r, cfg.alpha, cfg.dtype) == (8, 16, torch.bfloat16)
    assert cfg.exclude_names == ("lm_head", "embed_tokens") and cfg.layers is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be a positive"),
        ({"r": -3}, "r must be a positive"),
        ({"r": 2.5}, "'r' must be int"),
        ({"r": True}, "'r' must be int"),
        ({"alpha": 0}, "alpha must be non-zero"),
        ({"dtype": torch.int8}, "floating dtype"),
        ({"dtype": "fp8"}, "dtype 'fp8' unknown"),
        ({"target_roles": ("reader", "boss")}, "boss"),
        ({"target_names": ("q_proj(",)}, "invalid regex"),
        ({"layers": (-1,)}, "non-negative"),
    ],
)
def test_bad_values_raise_config_error(kwargs, match):
    with pytest.raises(ll.ConfigError, match=match):
        ll.LoraLiteConfig(variant="t_lora", **kwargs)


def test_sequences_are_normalised():
    cfg = ll.LoraLiteConfig(variant="t_lora", target_names="q_proj", layers=3, target_roles=["reader"])
    assert cfg.target_names == ("q_proj",) and cfg.layers == (3,) and cfg.target_roles == ("reader",)
    assert ll.LoraLiteConfig(variant="t_lora", layers=range(2)).layers == (0, 1)


def test_dict_round_trip_keeps_type_and_dtype():
    cfg = ll.LoraLiteConfig(variant="t_scale", r=3, start=0.25, dtype=torch.float16, layers=[0])
    data = cfg.to_dict()
    assert data["dtype"] == "float16" and data["start"] == 0.25
    again = ll.LoraLiteConfig.from_dict(data)
    assert again == cfg and type(again) is type(cfg)


def test_positional_arguments_are_refused():
    with pytest.raises(ll.ConfigError, match="keyword"):
        ll.LoraLiteConfig("t_lora")
