"""Each variant's conformance kit as its plugin's own tests define it (found, not copied),
and the same kit moved onto other models (Qwen3 from config, bnb, GPT-2).

A plugin's kit is the first ``VariantConformance`` subclass for that variant in its
``plugins/*/tests/test_*.py``; its ``config_kwargs``, ``train_lr``, ``min_loss_drop``...
carry over. An installed variant without a plugin directory here gets the kit's defaults.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import lora_lite as ll
from lora_lite.testing import VariantConformance

from .models import tiny_qwen3, token_batch

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


@functools.cache
def plugin_kits() -> dict[str, type[VariantConformance]]:
    kits: dict[str, type[VariantConformance]] = {}
    for path in sorted(PLUGINS.glob("*/tests/test_*.py")):
        plugin = path.parents[1].name
        if plugin.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"plugin_kits.{plugin}.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for obj in vars(module).values():  # in definition order: the first kit of a variant wins
            if isinstance(obj, type) and issubclass(obj, VariantConformance) and obj.variant:
                kits.setdefault(obj.variant, obj)
    return kits


def kit_for(variant: str, model_kit: type | None = None) -> VariantConformance:
    """The plugin's kit for ``variant``, on ``model_kit``'s model when given (a mixin whose
    ``make_model`` / ``make_batch`` / ``run_model`` replace the toy's)."""
    plugin_kit = plugin_kits().get(variant, VariantConformance)
    bases = (model_kit, plugin_kit) if model_kit is not None else (plugin_kit,)
    return type(f"Kit_{variant}", bases, {"variant": variant})()


def config_kwargs(variant: str) -> dict:
    """The knobs the variant's plugin tests run the kit with."""
    return dict(plugin_kits().get(variant, VariantConformance).config_kwargs)


def calibration_for(variant: str, batch):
    """``[batch]`` for a data-calibrated variant (one with a ``group_init`` hook), else ``None``."""
    return [batch] if ll.get_variant(variant).hook("group_init") is not None else None


class Qwen3Models:
    """Kit mixin: a Qwen3-architecture causal LM from config, token batches, logits."""

    def make_model(self):
        return tiny_qwen3(self.seed)

    def make_batch(self, model):
        return token_batch(model.config.vocab_size)

    def run_model(self, model, batch):
        return model(**batch).logits

    def calibration_data(self, model):
        return calibration_for(self.variant, self.make_batch(model))
