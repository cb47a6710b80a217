"""Bad input, one table: every case raises one exact ``LoraLiteError`` subclass whose message
names the cause and the fix, and leaves the model exactly as it was (outputs, every
``state_dict`` tensor and key, ``requires_grad`` flags, hooks, attachments), no file behind
and the variant registry as it was. Add a row here for every new refusal.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora_lite as ll
from lora_lite import plugins
from lora_lite.testing import ToyTransformer, assert_model_unchanged, snapshot_model

from .support.reliability_variants import DenseThenQuantized, ToyCalibrated, TwoScaled, register_toys, unregister_toys


def toy(n_layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return ToyTransformer(n_layers=n_layers).eval()


def meta_toy() -> nn.Module:
    with torch.device("meta"):
        return ToyTransformer()


class Ctx:
    """What a case's ``setup``/``act`` may use: the model, an input, a temp dir, monkeypatch."""

    def __init__(self, model: nn.Module, tmp: Path, mp: pytest.MonkeyPatch) -> None:
        self.model, self.tmp, self.mp = model, tmp, mp
        self.x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))

    def checkpoint(self) -> Path:
        """A valid checkpoint of a trained LoRA on ``toy()`` (the base every load case starts from)."""
        src = toy()
        ll.attach(src, ll.LoraLiteConfig(variant="lora", r=2))
        with torch.no_grad():
            for p in src.parameters():
                if p.requires_grad:
                    p.normal_()
        return ll.save(src, self.tmp / "good.safetensors")

    def rewrite(self, name: str, meta_fn=None, tensor_fn=None) -> Path:
        with safe_open(str(self.checkpoint()), framework="pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        out = self.tmp / name
        save_file(tensor_fn(tensors) if tensor_fn else tensors, str(out), metadata=meta_fn(meta) if meta_fn else meta)
        return out

    def write(self, name: str, data: bytes) -> Path:
        (self.tmp / name).write_bytes(data)
        return self.tmp / name

    def fake_entry_points(self, **targets: Any) -> None:
        """Replace the installed plugins by fake entry points ``name -> object or exception``."""

        class EP:
            def __init__(self, name, target):
                self.name, self.target = name, target
                self.dist = types.SimpleNamespace(name=f"lora-lite-{name}", version="9.9")

            def load(self):
                if isinstance(self.target, BaseException):
                    raise self.target
                return self.target

        eps = [EP(n, t) for n, t in targets.items()]
        real = metadata.entry_points
        self.mp.setattr(plugins.metadata, "entry_points",
                        lambda group=None, **kw: eps if group == plugins.ENTRY_POINT_GROUP else real(group=group, **kw))
        ll.reload_plugins()

    def env(self, **values: str) -> None:
        for k, v in values.items():
            self.mp.setenv(k, v)
        ll.reload_plugins()


def cfg(**kw) -> ll.LoraLiteConfig:
    return ll.LoraLiteConfig(**{"variant": "lora", "r": 2, **kw})


def edit_record(**changes) -> Callable[[dict], dict]:
    def meta_fn(meta):
        recs = json.loads(meta["adapters"])
        for k, v in changes.items():
            recs[0]["config"][k] = v
        return {**meta, "adapters": json.dumps(recs)}

    return meta_fn


class BadSignature:
    name = "t_badsig"

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg, rank):
        return {}

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        return y


class SelfMethod:
    name = "t_selfmethod"

    def param_specs(d_in, d_out, cfg):
        return {}

    def forward(self, layer, x, y):  # written as a method
        return y


class NotADataclassConfig(ll.LoraLiteConfig):
    variant: str = "t_nodataclass"
    knob: float = 1.0


class NoDataclass:
    name = "t_nodataclass"
    config_class = NotADataclassConfig

    def param_specs(d_in, d_out, cfg):
        return {}

    def forward(layer, x, y):
        return y


@dataclass(kw_only=True)  # the only way a dataclass subclass can have a field without a default
class KnobWithoutDefaultConfig(ll.LoraLiteConfig):
    variant: str = "t_nodefault"
    other: int


class KnobWithoutDefault:
    name = "t_nodefault"
    config_class = KnobWithoutDefaultConfig

    def param_specs(d_in, d_out, cfg):
        return {}

    def forward(layer, x, y):
        return y


@dataclass
class OtherNameConfig(ll.LoraLiteConfig):
    variant: str = "t_othername"


class MismatchedConfigName:
    name = "t_mismatch"
    config_class = OtherNameConfig

    def param_specs(d_in, d_out, cfg):
        return {}

    def forward(layer, x, y):
        return y


class WrongShape:
    name = "t_wrongshape"

    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_in,), init=0.0)}

    def forward(layer, x, y):
        return x * layer.lora_s  # (..., d_in), not y's (..., d_out)


class ReturnsTuple:
    name = "t_tuple"

    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

    def forward(layer, x, y):
        return y, layer.lora_s


class ChangesDtype:
    name = "t_dtype"

    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

    def forward_input(layer, x):
        return x.double()


class SpecsRaise:
    name = "t_specsraise"

    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out // 0,), init=0.0)}

    def forward(layer, x, y):
        return y


class OnlyConv1D:
    name = "t_onlyconv1d"
    layer_kinds = ("conv1d",)

    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out,), init=0.0)}

    def forward(layer, x, y):
        return y + layer.lora_s


def _attach_registered(plugin):
    """A case whose setup registers ``plugin`` (in-process) and whose act attaches it."""
    return dict(act=lambda c: ll.attach(c.model, ll.LoraLiteConfig(variant=plugin.name, r=2)),
                setup=lambda c: ll.register(plugin))


REGISTERED_IN_CASES = ("t_wrongshape", "t_tuple", "t_dtype", "t_specsraise", "t_onlyconv1d")


@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[[Ctx], Any]
    error: type[ll.LoraLiteError]
    cause: str  # regex: what went wrong
    fix: str  # regex: what to do about it
    setup: Callable[[Ctx], Any] | None = None
    file: Callable[[Ctx], Path] | None = None  # written before the snapshot, as ``ctx.path``
    model: Callable[[], nn.Module] = toy
    forward: bool = True  # compare outputs (not for a meta model)


def _attach(**kw):
    return lambda c: ll.attach(c.model, cfg(**kw))


def _load(c: Ctx):
    return ll.load(c.model, c.path)


CASES = [
    # -- variants and plugins ---------------------------------------------------------------
    Case("unknown_variant", lambda c: ll.attach(c.model, ll.LoraLiteConfig(variant="nosuch")),
         ll.UnknownVariantError, r"unknown variant 'nosuch'.*Installed variants: .*lora",
         r"pip install lora-lite-nosuch"),
    Case("plugin_import_error", lambda c: ll.LoraLiteConfig(variant="t_broken"),
         ll.UnknownVariantError, r"installed \(lora-lite-t_broken 9\.9\) but failed to load: ImportError.*missing_dep",
         r"Reinstall or fix that plugin",
         setup=lambda c: c.fake_entry_points(t_broken=ImportError("No module named 'missing_dep'"))),
    Case("plugin_bad_hook_signature_registered", lambda c: ll.register(BadSignature),
         ll.PluginError, r"'t_badsig' has a hook that does not match the contract.*rank",
         r"Fix its signature.*param_specs\(d_in, d_out, cfg, target\)"),
    Case("plugin_bad_hook_signature_entry_point", lambda c: ll.LoraLiteConfig(variant="t_badsig"),
         ll.UnknownVariantError, r"failed to load: PluginError.*does not match the contract.*rank",
         r"Fix its signature.*param_specs\(d_in, d_out, cfg, target\)",
         setup=lambda c: c.fake_entry_points(t_badsig=BadSignature)),
    Case("plugin_hook_written_as_method", lambda c: ll.register(SelfMethod),
         ll.PluginError, r"'t_selfmethod': hook forward\(self, \.\.\.\) is written as a method",
         r"Drop the 'self' parameter \(e\.g\. def forward\(layer, x, y\)\)"),
    Case("plugin_config_not_a_dataclass", lambda c: ll.register(NoDataclass),
         ll.PluginError, r"NotADataclassConfig is not decorated with @dataclass", r"Add @dataclass above it"),
    Case("plugin_knob_without_default", lambda c: ll.register(KnobWithoutDefault),
         ll.PluginError, r"knob\(s\) \['other'\] of KnobWithoutDefaultConfig have no default", r"every knob needs one"),
    Case("plugin_config_names_another_variant", lambda c: ll.register(MismatchedConfigName),
         ll.PluginError, r"OtherNameConfig.variant defaults to 't_othername'", r"declare `variant: str = 't_mismatch'`"),
    Case("plugin_entry_point_name_disagrees", lambda c: ll.LoraLiteConfig(variant="t_epname"),
         ll.UnknownVariantError, r"entry point 't_epname' .* loads a variant named 't_wrongshape'",
         r"rename the entry point to 't_wrongshape'", setup=lambda c: c.fake_entry_points(t_epname=WrongShape)),
    Case("plugin_forward_wrong_shape", error=ll.PluginError,
         cause=r"hook forward on layers\.0\.\w+ \(Linear \d+ -> \d+\) returned a tensor of shape \(2, 32\)",
         fix=r"must return one tensor of shape \(2, \d+\)", **_attach_registered(WrongShape)),
    Case("plugin_forward_returns_tuple", error=ll.PluginError,
         cause=r"hook forward on layers\.0\.\w+ .* returned a tuple", fix=r"must return one tensor",
         **_attach_registered(ReturnsTuple)),
    Case("plugin_forward_input_changes_dtype", error=ll.PluginError,
         cause=r"hook forward_input .* returned a tensor of shape \(2, \d+\) and dtype torch\.float64",
         fix=r"dtype torch\.float32 \(the same as its input x\)", **_attach_registered(ChangesDtype)),
    Case("plugin_param_specs_raises", error=ll.AttachError,
         cause=r"t_specsraise: param_specs of layers\.0\.\w+ \(\d+ -> \d+\) raised ZeroDivisionError",
         fix=r"Nothing was attached", **_attach_registered(SpecsRaise)),
    Case("plugin_unsupported_layer_kind", error=ll.TargetingError,
         cause=r"supports the layer kinds \['conv1d'\], but target layers\.0\.\w+ is a 'linear' layer",
         fix=r"Keep those layers out of the targets", **_attach_registered(OnlyConv1D)),
    Case("plugin_disabled_by_env", lambda c: ll.LoraLiteConfig(variant="pissa"),
         ll.UnknownVariantError, r"disabled by LORA_LITE_DISABLE_PLUGINS='pissa'",
         r"remove 'pissa' from that variable", setup=lambda c: c.env(LORA_LITE_DISABLE_PLUGINS="pissa")),
    Case("plugin_not_selected_by_env", lambda c: ll.LoraLiteConfig(variant="pissa"),
         ll.UnknownVariantError, r"not selected by LORA_LITE_PLUGINS='lora'",
         r"add 'pissa' to that variable, or unset it", setup=lambda c: c.env(LORA_LITE_PLUGINS="lora")),
    # -- config ---------------------------------------------------------------------------------
    Case("config_unknown_knob", lambda c: cfg(rank=4), ll.ConfigError,
         r"unknown config field\(s\) \['rank'\]", r"Shared fields: \[.*'r'"),
    Case("config_unknown_variant_knob", lambda c: ll.LoraLiteConfig(variant="pissa", niters=2), ll.ConfigError,
         r"unknown config field\(s\) \['niters'\] for variant 'pissa'", r"knobs: \['svd', 'niter', 'seed'"),
    Case("config_wrong_type_r", lambda c: cfg(r=2.5), ll.ConfigError, r"got 2\.5 \(float\)", r"'r' must be int"),
    Case("config_wrong_type_knob", lambda c: ll.LoraLiteConfig(variant="pissa", svd="randomized"), ll.ConfigError,
         r"got 'randomized'", r"'svd' must be Literal\['full', 'lowrank'\]"),
    Case("config_wrong_type_dtype", lambda c: cfg(dtype=torch.int8), ll.ConfigError,
         r"got torch\.int8", r"must be a floating dtype"),
    Case("config_r_zero", lambda c: cfg(r=0), ll.ConfigError, r"got 0", r"r must be a positive integer"),
    Case("config_r_negative", lambda c: cfg(r=-3), ll.ConfigError, r"got -3", r"r must be a positive integer"),
    Case("config_alpha_zero", lambda c: cfg(alpha=0), ll.ConfigError, r"no-op that never trains",
         r"alpha must be non-zero"),
    Case("config_knob_out_of_range", lambda c: ll.LoraLiteConfig(variant="pissa", niter=-1), ll.ConfigError,
         r"got -1", r"niter must be >= 0"),
    Case("config_r_exceeds_layer_for_pissa", _attach(variant="pissa", r=20), ll.ConfigError,
         r"param_specs of layers\.0\.k_proj \(32 -> 16\).*r=20 exceeds min\(d_in, d_out\)=16",
         r"lower r or narrow the targets"),
    Case("attach_non_config", lambda c: ll.attach(c.model, {"variant": "lora"}), ll.ConfigError,
         r"got dict", r"build one with lora_lite\.LoraLiteConfig\(variant="),
    Case("attach_non_module", lambda c: ll.attach("model.pt", cfg()), ll.AttachError,
         r"got str", r"pass the model as the first argument"),
    # -- targets and attach state -----------------------------------------------------------
    Case("no_target_matched", _attach(target_names=("qkv_proj",)), ll.TargetingError,
         r"no layer matched target_roles=\(\) target_names=\('qkv_proj',\).*layers\.0\.q_proj: Linear\(32 -> 32\)",
         r"Adjust target_names"),
    Case("attach_twice", _attach(), ll.AlreadyAttachedError, r"14 target\(s\) already carry an adapter",
         r"name it: lora_lite\.attach\(model, cfg, name='\.\.\.'\); to replace it, lora_lite\.detach\(model\) first",
         setup=lambda c: ll.attach(c.model, cfg())),
    Case("attach_duplicate_name", lambda c: ll.attach(c.model, cfg(target_names=("v_proj",)), name="math"),
         ll.AlreadyAttachedError, r"already has an attachment named 'math' \(attachments: \['math'\]\)",
         r"pick another name, or detach it first", setup=lambda c: ll.attach(c.model, cfg(), name="math")),
    Case("attach_bad_name", lambda c: ll.attach(c.model, cfg(), name="my adapter"), ll.ConfigError,
         r"attachment name 'my adapter'", r"must be an identifier"),
    Case("set_active_unknown_name", lambda c: ll.set_active(c.model, ["math", "code"]), ll.NotAttachedError,
         r"no attachment named \['code'\]", r"attachments: \['math'\]",
         setup=lambda c: ll.attach(c.model, cfg(), name="math")),
    Case("save_unknown_name", lambda c: ll.save(c.model, c.tmp / "a.safetensors", names=["code"]), ll.NotAttachedError,
         r"no attachment named \['code'\]", r"attachments: \['math'\]",
         setup=lambda c: ll.attach(c.model, cfg(), name="math")),
    Case("detach_without_attach", lambda c: ll.detach(c.model), ll.NotAttachedError,
         r"ToyTransformer carries no lora-lite adapter", r"call lora_lite\.attach\(model, cfg\)"),
    Case("detach_a_detached_handle", lambda c: c.handle.detach(), ll.NotAttachedError,
         r"already detached", r"lora_lite\.attachments\(model\) lists the live ones",
         setup=lambda c: (setattr(c, "handle", ll.attach(c.model, cfg())), c.handle.detach())),
    Case("save_without_attach", lambda c: ll.save(c.model, c.tmp / "out.safetensors"), ll.NotAttachedError,
         r"carries no lora-lite adapter", r"call lora_lite\.attach\(model, cfg\)"),
    Case("model_on_meta_device", _attach(), ll.AttachError, r"live on the meta device",
         r"materialise the model", model=meta_toy, forward=False),
    # -- weights ----------------------------------------------------------------------------------
    Case("quantized_layer_for_dense_variant", _attach(variant="pissa", r=4), ll.WeightAccessError,
         r"(?i)init of qproj \(Linear4bit\).*quantized", r"(?i)dequantize", model=DenseThenQuantized),
    # -- calibration --------------------------------------------------------------------------------
    Case("calibration_missing", lambda c: ll.attach(c.model, cfg(variant="t_calib")), ll.CalibrationError,
         r"t_calib: group_init \(rolled back\): t_calib needs calibration data", r"pass calibration_data="),
    Case("calibration_empty", lambda c: ll.attach(c.model, cfg(variant="t_calib"), calibration_data=[]),
         ll.CalibrationError, r"calibration_data is an empty list", r"pass at least one batch"),
    Case("calibration_nan", lambda c: ll.attach(c.model, cfg(variant="t_calib"),
                                                calibration_data=[c.x, c.x.clone().index_fill_(1, torch.tensor([2]), float("nan"))]),
         ll.CalibrationError, r"calibration_data\[1\] holds NaN or inf", r"Drop or clean those batches"),
    Case("calibration_inf_in_dict", lambda c: ll.attach(c.model, cfg(variant="t_calib"),
                                                        calibration_data={"x": c.x, "bias": torch.tensor([float("inf")])}),
         ll.CalibrationError, r"calibration_data\['bias'\] holds NaN or inf", r"Drop or clean"),
    Case("calibration_nan_in_a_stream", lambda c: ll.attach(c.model, cfg(variant="t_calib"), calibration_data=(
        b for b in (c.x, c.x, c.x * float("nan")))),
         ll.CalibrationError, r"calibration_data batch 2 holds NaN or inf", r"Drop or clean"),
    Case("calibration_not_iterable", lambda c: ll.attach(c.model, cfg(variant="t_calib"), calibration_data=3),
         ll.CalibrationError, r"got int", r"must be an iterable of model inputs"),
    Case("calibration_for_weight_only_variant", lambda c: ll.attach(c.model, cfg(), calibration_data=[c.x]),
         ll.ConfigError, r"'lora' takes no calibration data", r"drop calibration_data"),
    # -- forward ------------------------------------------------------------------------------------
    Case("forward_without_positional_input", lambda c: c.model.layers[0].q_proj(input=c.x), ll.ForwardError,
         r"layers\.0\.q_proj \(Linear\) was called without a positional input tensor \(keyword arguments: \['input'\]\)",
         r"Call it as layer\(x\)", setup=lambda c: ll.attach(c.model, cfg())),
    Case("forward_input_not_a_tensor", lambda c: c.model.layers[0].q_proj([1.0] * 32), ll.ForwardError,
         r"called with a list as its input", r"Call it as layer\(x\) with a tensor",
         setup=lambda c: ll.attach(c.model, cfg(variant="t_gate"))),
    Case("forward_extra_positional_argument", lambda c: c.model.a(c.x, 2.0), ll.ForwardError,
         r"a \(ScaledLinear\) was called with extra arguments \(1 more positional", r"exclude_names",
         setup=lambda c: ll.attach(c.model, cfg()), model=TwoScaled),
    Case("forward_extra_keyword_argument", lambda c: c.model.b(c.x, scale=2.0), ll.ForwardError,
         r"b \(ScaledLinear\) was called with extra arguments.*\['scale'\]", r"Call it as layer\(x\)",
         setup=lambda c: ll.attach(c.model, cfg(variant="t_gate")), model=TwoScaled),
    # -- checkpoints --------------------------------------------------------------------------------
    Case("load_different_architecture", _load, ll.CheckpointMismatchError,
         r"saved for 14 target\(s\) but its config selects 21 here", r"same architecture",
         model=lambda: toy(n_layers=3),
         file=lambda c: c.checkpoint()),
    Case("load_different_base_weights", _load, ll.CheckpointMismatchError,
         r"base weights of 1 target\(s\) differ.*layers\.1\.up_proj", r"same base model",
         setup=lambda c: c.model.layers[1].up_proj.weight.data.mul_(1.01),
         file=lambda c: c.checkpoint()),
    Case("load_truncated", _load,
         ll.CheckpointFormatError, r"not a readable safetensors file \(truncated or corrupt\?\)",
         r"Save it again with lora_lite\.save",
         file=lambda c: c.write("t", c.checkpoint().read_bytes()[:-100])),
    Case("load_corrupt_header", _load,
         ll.CheckpointFormatError, r"truncated or corrupt", r"restore an intact copy",
         file=lambda c: c.write("c", b"\x20\x00\x00\x00\x00\x00\x00\x00{not json, not at all}")),
    Case("load_not_safetensors", _load,
         ll.CheckpointFormatError, r"not a readable safetensors file", r"Save it again with lora_lite\.save",
         file=lambda c: c.write("adapter_config.json", b'{"peft_type": "LORA", "r": 8}')),
    Case("load_foreign_safetensors", _load,
         ll.CheckpointFormatError, r"not a lora-lite checkpoint \(metadata format='pt'\)",
         r"reads files written by lora_lite\.save",
         file=lambda c: c.rewrite("f", meta_fn=lambda m: {"format": "pt"})),
    Case("load_empty_file", _load, ll.CheckpointFormatError, r"is empty",
         r"Load a file written by lora_lite\.save",
         file=lambda c: c.write("e", b"")),
    Case("load_missing_file", _load, ll.CheckpointFormatError,
         r"does not exist", r"check the path",
         file=lambda c: c.tmp / "nope.safetensors"),
    Case("load_pickle", _load,
         ll.CheckpointFormatError, r"looks like a pickle/torch\.save file.*never unpickles",
         r"re-save it with lora_lite\.save",
         file=lambda c: (torch.save({"lora_A": torch.zeros(2)}, c.tmp / "a.pt"), c.tmp / "a.pt")[1]),
    Case("load_unknown_variant", _load,
         ll.UnknownVariantError, r"written with lora-lite-lora .*unknown variant 'nosuch'",
         r"pip install lora-lite-nosuch",
         file=lambda c: c.rewrite("u", meta_fn=edit_record(variant="nosuch"))),
    Case("load_knob_unknown_to_installed_plugin", _load,
         ll.ConfigError, r"unknown config field\(s\) \['newknob'\]", r"install that version if yours differs",
         file=lambda c: c.rewrite("k", meta_fn=edit_record(newknob=1))),
    Case("load_newer_core_format", _load,
         ll.CheckpointFormatError, r"format version '2'.*reads version 1", r"pip install -U lora-lite-core",
         file=lambda c: c.rewrite("n", meta_fn=lambda m: {**m, "format_version": "2"})),
    Case("load_malformed_metadata", _load,
         ll.CheckpointFormatError, r"malformed lora-lite metadata", r"Save the adapter again",
         file=lambda c: c.rewrite("m", meta_fn=lambda m: {**m, "adapters": "[{}]"})),
    Case("load_tensor_shape_mismatch", _load,
         ll.CheckpointMismatchError, r"layers\.0\.q_proj\.lora_A has shape \(3, 32\) in the file but \(2, 32\)",
         r"Install the plugin version that wrote it",
         file=lambda c: c.rewrite("s", tensor_fn=lambda t: {**t, "layers.0.q_proj.lora_A": torch.zeros(3, 32)})),
    Case("load_tensor_dtype_mismatch", _load,
         ll.CheckpointMismatchError, r"lora_A is torch\.float16 in the file but torch\.float32",
         r"save the adapter again",
         file=lambda c: c.rewrite("d", tensor_fn=lambda t: {**t, "layers.0.q_proj.lora_A": t["layers.0.q_proj.lora_A"].half()})),
    Case("load_missing_tensor", _load,
         ll.CheckpointMismatchError, r"Missing from the file: \['layers\.1\.o_proj\.lora_B'\]",
         r"Install the plugin version that wrote it",
         file=lambda c: c.rewrite("x", tensor_fn=lambda t: {k: v for k, v in t.items() if k != "layers.1.o_proj.lora_B"})),
    Case("load_into_attached_model", _load, ll.AlreadyAttachedError,
         r"already carry an adapter", r"lora_lite\.detach\(model\) first",
         setup=lambda c: ll.attach(c.model, cfg(variant="t_gate")),
         file=lambda c: c.checkpoint()),
]


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch):
    register_toys()
    try:
        ctx = Ctx(case.model(), tmp_path, monkeypatch)
        if case.setup is not None:
            case.setup(ctx)
        if case.file is not None:
            ctx.path = case.file(ctx)
        batch = ctx.x if case.forward else None
        before = snapshot_model(ctx.model, batch)
        files = sorted(tmp_path.rglob("*"))
        variants = [v.name for v in ll.list_variants()]
        with pytest.raises(ll.LoraLiteError) as info:
            case.act(ctx)
        err = info.value
        assert type(err) is case.error, f"raised {type(err).__name__}: {err}"
        msg = str(err)
        assert re.search(case.cause, msg, re.S), f"the message does not name the cause /{case.cause}/:\n{msg}"
        assert re.search(case.fix, msg, re.S), f"the message does not name the fix /{case.fix}/:\n{msg}"
        assert_model_unchanged(ctx.model, before, batch)
        assert sorted(tmp_path.rglob("*")) == files, "a refused call left a file behind"
        assert [v.name for v in ll.list_variants()] == variants, "a refused call changed the registered variants"
    finally:
        monkeypatch.undo()
        unregister_toys()
        for name in REGISTERED_IN_CASES:
            if name in {v.name for v in ll.list_variants()}:
                ll.unregister(name)
        ll.reload_plugins()


def test_calibration_is_checked_before_group_init_runs(tmp_path, monkeypatch):
    """In-memory calibration data with NaN never reaches the variant."""
    register_toys()
    try:
        model = toy()
        calls = ToyCalibrated.group_init_calls
        bad = [torch.full((2, 32), float("nan"))]
        with pytest.raises(ll.CalibrationError):
            ll.attach(model, cfg(variant="t_calib"), calibration_data=bad)
        assert ToyCalibrated.group_init_calls == calls
        good = [torch.randn(2, 5, 32)]
        att = ll.attach(model, cfg(variant="t_calib"), calibration_data=good)
        assert ToyCalibrated.group_init_calls == calls + 1
        mean = good[0].reshape(-1, 32).mean(0)
        torch.testing.assert_close(model.layers[0].q_proj.lora_mean, model.layers[0].norm(good[0]).reshape(-1, 32).mean(0))
        assert not torch.equal(model.layers[0].q_proj.lora_mean, mean)  # the layer's input, not the model's
        att.detach()
    finally:
        unregister_toys()


def test_calibrated_variant_reloads_exactly_without_data(tmp_path):
    """What calibration chose is saved: load runs no group_init and needs no data."""
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    register_toys()
    try:
        model = toy()
        att = ll.attach(model, cfg(variant="t_calib"), calibration_data=[x, 2 * x])
        with torch.no_grad():
            for p in att.trainable_parameters():
                p.normal_()
        out = model(x).detach()
        path = ll.save(model, tmp_path / "calibrated.safetensors")
        calls = ToyCalibrated.group_init_calls
        fresh = toy()
        ll.load(fresh, path)
        assert ToyCalibrated.group_init_calls == calls
        assert torch.equal(fresh.layers[1].up_proj.lora_mean, model.layers[1].up_proj.lora_mean)
        assert torch.equal(fresh(x), out)
    finally:
        unregister_toys()
