"""Discovery, registration, validation, isolation of broken plugins, env-var selection."""

from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import plugins


def test_unknown_variant_lists_installed_and_install_hint():
    with pytest.raises(ll.UnknownVariantError) as err:
        ll.LoraLiteConfig(variant="nosuch")
    msg = str(err.value)
    assert "t_lora" in msg and "pip install lora-lite-nosuch" in msg


def test_typed_knobs_and_unknown_knob_error():
    cfg = ll.LoraLiteConfig(variant="t_scale", r=2, start=0.5)
    assert type(cfg).__name__ == "ScaleConfig" and cfg.start == 0.5
    with pytest.raises(ll.ConfigError, match=r"'strat'.*knobs: \['start'\]"):
        ll.LoraLiteConfig(variant="t_scale", strat=0.5)
    with pytest.raises(ll.ConfigError, match="start"):
        ll.LoraLiteConfig(variant="t_scale", start="big")


def test_unknown_hook_name_is_rejected():
    class Typo:
        name = "t_typo"

        @staticmethod
        @ll.hookimpl
        def param_specs(d_in, d_out, cfg):
            return {}

        @staticmethod
        @ll.hookimpl
        def forwrd(layer, x, y):
            return y

    with pytest.raises(ll.PluginError, match="forwrd"):
        ll.register(Typo)


def test_shadowing_an_installed_variant_needs_replace():
    installed = [v for v in ll.list_variants() if v.distribution]
    if not installed:
        pytest.skip("no entry-point variant installed")
    name = installed[0].name

    class Shadow:
        @staticmethod
        @ll.hookimpl
        def param_specs(d_in, d_out, cfg):
            return {}

        @staticmethod
        @ll.hookimpl
        def forward(layer, x, y):
            return y

    Shadow.name = name
    with pytest.raises(ll.PluginError, match="replace=True"):
        ll.register(Shadow)
    assert ll.get_variant(name).distribution == installed[0].distribution


class _FakeDist:
    def __init__(self, name):
        self.name, self.version = name, "9.9"


class _FakeEP:
    def __init__(self, name, target):
        self.name, self.dist, self._target = name, _FakeDist(f"lora-lite-{name}"), target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def fake_entry_points(monkeypatch):
    good = types.ModuleType("fake_good")
    good.name = "t_good"

    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

    @ll.hookimpl
    def forward(layer, x, y):
        return y + layer.lora_s

    good.param_specs, good.forward = param_specs, forward
    eps = [
        _FakeEP("t_good", good),
        _FakeEP("t_importerror", ImportError("No module named 'missing_dep'")),
        _FakeEP("t_nohooks", types.SimpleNamespace(name="t_nohooks")),
    ]
    real = metadata.entry_points
    monkeypatch.setattr(
        plugins.metadata, "entry_points",
        lambda group=None, **kw: eps if group == plugins.ENTRY_POINT_GROUP else real(group=group, **kw),
    )
    yield
    monkeypatch.setattr(plugins.metadata, "entry_points", real)
    monkeypatch.delenv("LORA_LITE_PLUGINS", raising=False)
    monkeypatch.delenv("LORA_LITE_DISABLE_PLUGINS", raising=False)
    ll.reload_plugins()


def test_broken_plugins_are_reported_and_isolated(fake_entry_points):
    ll.reload_plugins()
    broken = {b.name: b for b in ll.broken_plugins()}
    assert set(broken) == {"t_importerror", "t_nohooks"}
    assert broken["t_importerror"].distribution == "lora-lite-t_importerror"
    assert broken["t_importerror"].version == "9.9"
    assert "missing_dep" in broken["t_importerror"].error
    assert ll.get_variant("t_good").module == "fake_good"
    assert ll.get_variant("t_lora")  # in-process registrations survive a reload
    with pytest.raises(ll.UnknownVariantError, match="failed to load.*missing_dep"):
        ll.get_variant("t_importerror")
    model = nn.Sequential(nn.Linear(4, 4))
    ll.attach(model, ll.LoraLiteConfig(variant="t_good", r=1))
    assert torch.equal(model(torch.ones(1, 4)), model[0](torch.ones(1, 4)))


def test_env_vars_select_and_disable_plugins(fake_entry_points, monkeypatch):
    monkeypatch.setenv("LORA_LITE_DISABLE_PLUGINS", "t_importerror,lora-lite-t_nohooks")
    ll.reload_plugins()
    assert ll.broken_plugins() == []
    assert ll.get_variant("t_good")
    monkeypatch.delenv("LORA_LITE_DISABLE_PLUGINS")
    monkeypatch.setenv("LORA_LITE_PLUGINS", "")
    ll.reload_plugins()
    assert [v.name for v in ll.list_variants() if v.distribution] == []
    monkeypatch.setenv("LORA_LITE_PLUGINS", "t_good")
    ll.reload_plugins()
    assert [v.name for v in ll.list_variants() if v.distribution] == ["t_good"]


def test_forward_path_does_not_dispatch_through_pluggy(model, x, monkeypatch):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    before = model(x)

    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"pm.hook.{name} called on the forward path")

    monkeypatch.setattr(plugins._registry.pm, "hook", Boom())
    torch.testing.assert_close(model(x), before)


def test_subset_argument_hooks_are_bound_by_name():
    info = ll.get_variant("t_scale")
    specs = info.hook("param_specs")(7, 3, ll.LoraLiteConfig(variant="t_scale"))
    assert specs["lora_g"].shape == (7,)
    assert sys.modules[info.module]


class _CountingEP(_FakeEP):
    loads: list[str] = []

    def load(self):
        _CountingEP.loads.append(self.name)
        return super().load()


def test_asking_for_one_variant_imports_only_its_plugin(monkeypatch):
    class Short:  # the short plugin form: no @staticmethod, no @hookimpl
        name = "t_short"

        def param_specs(d_in, d_out, cfg):
            return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

        def forward(layer, x, y):
            return y + layer.lora_s

    other = types.SimpleNamespace(name="t_other")
    eps = [_CountingEP("t_short", Short), _CountingEP("t_other", other), _CountingEP("t_fail", ImportError("x"))]
    real = metadata.entry_points
    monkeypatch.setattr(plugins.metadata, "entry_points",
                        lambda group=None, **kw: eps if group == plugins.ENTRY_POINT_GROUP else real(group=group, **kw))
    _CountingEP.loads = []
    try:
        ll.reload_plugins()
        cfg = ll.LoraLiteConfig(variant="t_short", r=1)
        assert _CountingEP.loads == ["t_short"]
        model = nn.Sequential(nn.Linear(3, 2))
        ll.attach(model, cfg)
        with torch.no_grad():
            model[0].lora_s.fill_(1.0)
        torch.testing.assert_close(model(torch.zeros(1, 3)), model[0].bias[None] + 1)
        # listing imports the rest, and reports what failed
        assert {b.name for b in ll.broken_plugins()} == {"t_other", "t_fail"}
        assert sorted(_CountingEP.loads) == ["t_fail", "t_other", "t_short"]
    finally:
        monkeypatch.setattr(plugins.metadata, "entry_points", real)
        ll.reload_plugins()


def test_metadata_is_read_and_checked():
    info = ll.get_variant("lora")
    assert info.size_knob == "r" and "embedding" in info.layer_kinds and info.peft is not None and info.lrs
    assert ll.get_variant("pissa").layer_kinds is None  # undeclared: every linear-like kind

    class BadKnob:
        name = "t_badknob"
        size_knob = "alpha"  # a float field

        def param_specs(d_in, d_out, cfg):
            return {}

        def forward(layer, x, y):
            return y

    with pytest.raises(ll.PluginError, match="size_knob 'alpha' must name an integer field"):
        ll.register(BadKnob)
    BadKnob.size_knob, BadKnob.lrs = "r", (1e-3, -1.0)
    with pytest.raises(ll.PluginError, match="lrs must be a non-empty tuple of positive"):
        ll.register(BadKnob)
    assert "t_badknob" not in {v.name for v in ll.list_variants()}
