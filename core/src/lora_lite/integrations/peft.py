"""PEFT-format adapters in and out: ``export_peft`` / ``import_peft`` (peft itself not needed).

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight``
``(r, d_in)`` and ``.lora_B.weight`` ``(d_out, r)``; PEFT adds
``scaling * B A x`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
That is lora-lite's ``lora`` variant term for term, so both directions are exact.

Core knows no variant by name: a variant declares its format as ``peft = PeftFormat(...)``
(which adapter tensor becomes which PEFT key, config entries that identify it, and an
optional ``convert`` for variants PEFT stores differently, e.g. PiSSA's rank-``2r`` delta
against the original weight); export and import read that declaration. A format of
another ``peft_type`` (IA3, VERA, OFT, ...) also names which config knob is which
``adapter_config.json`` key (``config_fields``), tensors PEFT stores once per adapter
(``shared``, VeRA's projections), PEFT's tensor shapes (``shapes``) and, for a PEFT
adapter that is several lora-lite attachments, the config list that selects its modules
(``subset``, IA3's ``feedforward_modules``).

Anything that would change the math (another variant, ``rank_pattern`` where no format reads
it, a trained bias, ``modules_to_save``, a base-mutating init no variant declares reading,
missing or extra tensors) raises
:class:`~lora_lite.errors.PeftInteropError` before a file is written or the model touched;
PEFT itself only warns on missing keys. ``lora_dropout`` (a training regulariser, not
part of the adapter's function) and ``use_rslora`` are written and read by a variant whose
format maps them to its knobs (``config_of`` / ``knobs_of``: the ``lora`` plugin's
``dropout`` and ``use_rslora``); otherwise ``lora_dropout`` is accepted and not modelled and
``use_rslora`` is folded into ``alpha``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import _full_cpu, _is_sharded, _write_once, save
from ..config import LoraLiteConfig
from ..errors import ConfigError, NotAttachedError, PeftInteropError
from ..plugins import list_variants
from ..runtime import Attachment, attach_for_load, attachments
from ..targeting import block_index, linear_like_modules
from ..weights import dense_weight, original_weight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PeftFormat:
    """How a variant is written in, and read from, PEFT's adapter format; the variant
    declares it as its ``peft`` attribute (core knows no variant by name).

    :param keys: lora-lite tensor name -> PEFT key suffix (``"lora_A": "lora_A.weight"``).
    :param config: ``adapter_config.json`` entries that identify the format: written on
        export, and on import a file whose entries equal these (absent keys read as PEFT's
        defaults) is read by this variant (``{"use_dora": True}``).
    :param convert: ``(layer, cfg, tensors by lora-lite name) -> (tensors, r, alpha)`` for a
        variant PEFT stores differently (export only: such a format is chosen on import only
        with ``importable=True``); ``None`` copies the tensors as they are, both ways.
    :param peft_type: PEFT's ``peft_type`` (``"LORA"``). A LORA format gets the LoRA config
        entries (``r``, ``lora_alpha``, ...); any other gets only ``target_modules`` and
        what the fields below declare.
    :param config_fields: lora-lite config knob -> ``adapter_config.json`` key
        (``{"road_variant": "variant"}``): written from the config on export, read into it
        on import (non-LORA formats).
    :param shared: lora-lite tensor name -> full PEFT key of a tensor every target shares
        (``{"lora_vera_A": "base_model.vera_A"}``): written once, from the first target,
        and only when persistent (a non-persistent one is regenerated from the config). A
        name also in ``keys`` is a shared tensor PEFT saves under every target as well
        (RandLoRA's layers hold its shared buffers): written per target too, when persistent;
        on import each such copy is optional and must equal the shared one.
    :param shapes: lora-lite tensor name -> PEFT's shape of it, ``-1`` for the rest
        (``{"lora_l": (-1, 1)}``).
    :param subset: the config key listing the modules this variant holds within an adapter
        another variant's format reads (IA3's ``feedforward_modules``): such attachments
        export together into one adapter, and import splits it.
    :param neutral: config keys the import accepts whatever their value (dropout, init
        flags: they do not change the function the tensors compute), or that the format's
        ``knobs_of`` / ``read`` interpret and check (EVA's ``rank_pattern``: padded to one r).
    :param config_of: ``cfg -> adapter_config.json entries`` that depend on the variant's
        knobs (``{"use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout}``), written on
        export after ``config``.
    :param knobs_of: ``adapter_config.json -> LoraLiteConfig keyword arguments`` for import:
        they override the ``r`` / ``alpha`` core derives (``use_rslora`` folded into
        ``alpha``) or the ``config_fields`` read, and set the variant's knobs
        (``{"alpha": ..., "use_rslora": True}``; VB-LoRA's ``subtract_init=False``).
    :param importable: whether import may choose this format; ``None`` (default): only when
        ``convert`` is ``None``. ``True`` for a variant whose ``convert`` rewrites only some
        configurations (an init that changed the base weight), or whose ``convert`` writes
        another form than the PEFT files it reads (PiSSA: exports a LoRA delta, reads PEFT's
        unconverted ``init_lora_weights="pissa"`` files), the files it reads holding plain tensors.
    :param config_from: ``attachment -> adapter_config.json entries`` read from its tensors,
        written on export after the others (non-LORA formats; AdaLoRA's ``rank_pattern``).
    :param read: ``(adapter_config, module path, that module's tensors by lora-lite name) ->
        tensors to copy in``, on import before the model is touched (AdaLoRA puts the
        triplets ``rank_pattern`` kept back into their rows and rebuilds its mask); raise
        ``PeftInteropError`` for what cannot be read. ``None``: the file's tensors as they are.
    :param optional: names in ``keys`` a layer may lack (LoKr: each Kronecker factor is one
        matrix or a rank-r pair, by the layer's shape): export writes the mapped tensors a
        layer holds; import requires each module's tensors to be exactly the mapped ones the
        attached layer holds.
    """

    keys: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[nn.Module, LoraLiteConfig, Tensors], tuple[Tensors, int, float]] | None = None
    peft_type: str = "LORA"
    config_fields: dict[str, str] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    subset: str | None = None
    neutral: tuple[str, ...] = ()
    config_of: Callable[[LoraLiteConfig], dict[str, Any]] | None = None
    knobs_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    importable: bool | None = None
    optional: tuple[str, ...] = ()
    config_from: Callable[[Attachment], dict[str, Any]] | None = None
    read: Callable[[dict[str, Any], str, Tensors], Tensors] | None = None

    @property
    def reads(self) -> bool:
        """Whether ``import_peft`` may read files with this format."""
        return self.convert is None if self.importable is None else self.importable


# PEFT's LoraConfig defaults for the entries a format may use to identify itself
_LORA_DEFAULTS = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True}


def _format_of(info: Any) -> PeftFormat | None:
    fmt = info.peft
    if fmt is not None and not isinstance(fmt, PeftFormat):
        raise PeftInteropError(
            f"variant {info.name!r} declares peft={fmt!r}; it must be a lora_lite.PeftFormat."
        )
    return fmt


def _exportable() -> list[str]:
    return sorted(v.name for v in list_variants() if v.peft is not None)


@dataclass(frozen=True)
class LoraExport:
    """What ``export_peft(..., as_lora=True)`` wrote and how exact it is.

    :param path: the PEFT adapter directory.
    :param ranks: ``{module: rank}`` of each module's LoRA factors.
    :param max_rel_error: over all modules, ``max |B A - delta| / max |delta|`` (``delta``:
        the variant's merged weight minus the base weight), measured after writing.
    """

    path: Path
    ranks: dict[str, int]
    max_rel_error: float


def _single_attachment(model: nn.Module) -> Attachment:
    atts = attachments(model)
    if not atts:
        raise NotAttachedError(f"{type(model).__name__} carries no lora-lite adapter to export.")
    if len(atts) != 1:
        raise PeftInteropError(
            f"the model carries {len(atts)} attachments ({[a.name for a in atts]}); a PEFT adapter holds one "
            "config. Export a model with a single attachment (lora_lite.save(names=...) and load it alone)."
        )
    return atts[0]


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    as_lora: bool = False,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path | LoraExport:
    """Write the adapter on ``model`` as a PEFT adapter directory; return its path.

    ``PeftModel.from_pretrained(base, directory)`` then reproduces the lora-lite model's
    outputs, where ``base`` is the same model without any adapter (for PiSSA: the original
    weights, not ``W_res``). Module paths are relative to ``model``, so pass the model you
    attached to. ``task_type`` (e.g. ``"CAUSAL_LM"``) picks PEFT's model class on load.
    On an FSDP2-sharded model every rank must call it; rank 0 writes.

    ``as_lora=True`` writes ANY mergeable variant as a plain PEFT LoRA (which PEFT, vLLM and
    TGI load): per module, the truncated SVD of its weight delta (merged weight minus the
    base weight; a changed bias goes to PEFT's ``lora_bias``). ``rank=None`` keeps the
    delta's numerical rank (exact to fp32 rounding); a smaller ``rank`` truncates it. Returns
    a :class:`LoraExport` with the measured error, which is also written to the
    directory's ``README.md``.
    """
    if as_lora:
        return _export_as_lora(model, _single_attachment(model), Path(directory), rank, base_model_name_or_path,
                               task_type)
    if rank is not None:
        _single_attachment(model)
        raise PeftInteropError("rank= truncates an as_lora export; pass as_lora=True with it.")
    group = _export_group(model)
    tensors: Tensors = {}
    ranks = set()
    sharded = any(_is_sharded(v) for att, _ in group for v in att.adapter_tensors().values())
    for att, fmt in group:
        tensors.update(_export_tensors(att, fmt, ranks))
    att, fmt = group[0]
    base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if fmt.peft_type != "LORA":
        config = _native_config(model, group, task_type, base_name)
    else:
        (r, alpha), = ranks
        config = {
            "peft_type": fmt.peft_type,
            "task_type": task_type,
            "base_model_name_or_path": base_name,
            "r": r,
            "lora_alpha": alpha,
            "target_modules": _target_modules(model, att.target_names),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
            **fmt.config,
            **(fmt.config_of(att.cfg) if fmt.config_of is not None else {}),
        }
    out = Path(directory)

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    _write_once(sharded, write)
    return out


def _export_group(model: nn.Module) -> list[tuple[Attachment, PeftFormat]]:
    """The attachments one PEFT adapter holds, with their formats, the main one first: one
    attachment, or several whose formats share a peft_type and all but one declare a
    ``subset`` (IA3: ``ia3`` plus ``ia3_ff`` as ``feedforward_modules``)."""
    atts = attachments(model)
    if not atts:
        raise NotAttachedError(f"{type(model).__name__} carries no lora-lite adapter to export.")
    fmts = [_format_of(a.variant) for a in atts]
    if len(atts) > 1:
        subsets = [f.subset for f in fmts if f is not None]
        joinable = (len(subsets) == len(atts) and len({f.peft_type for f in fmts}) == 1
                    and len(set(subsets)) == len(subsets) and any(subsets))
        if not joinable:
            raise PeftInteropError(
                f"the model carries {len(atts)} attachments ({[a.name for a in atts]}); a PEFT adapter holds one "
                "config. Export a model with a single attachment (lora_lite.save(names=...) and load it alone)."
            )
    for att, fmt in zip(atts, fmts):
        if fmt is None:
            raise PeftInteropError(
                f"variant {att.variant.name!r} declares no PEFT format; installed variants that do: {_exportable()}."
            )
    return sorted(zip(atts, fmts), key=lambda p: p[1].subset is not None)


def _export_tensors(att: Attachment, fmt: PeftFormat, ranks: set) -> Tensors:
    tensors: Tensors = {}
    for name, layer in ((t.name, t.layer) for t in att.targets):
        mapped, held = set(fmt.keys) | set(fmt.shared), set(att.specs[name])
        need = mapped - set(fmt.optional)
        # a format with a convert may read more of the layer (LoRA's padded scale tensor)
        if not need <= held if fmt.convert is not None else not need <= held <= mapped:
            raise PeftInteropError(
                f"{name} holds adapter tensors {sorted(att.specs[name])} but the {att.variant.name} PEFT format maps "
                f"{sorted(set(fmt.keys) | set(fmt.shared))}: this configuration of the variant has tensors PEFT's format "
                "does not hold (see the variant's docs for the settings it exports; as_lora=True exports any mergeable "
                "one), or the variant's `peft` declaration is out of date."
            )
        # per-target copies of a shared tensor are cloned: safetensors refuses aliased tensors
        own = {k: _full_cpu(getattr(layer, k)).clone() if k in fmt.shared else _full_cpu(getattr(layer, k))
               for k in fmt.keys if k in held and (k not in fmt.shared or att.specs[name][k].persistent)}
        if fmt.convert is not None:
            own, r, alpha = fmt.convert(layer, att.cfg, own)
        else:
            r, alpha = att.cfg.r, att.cfg.alpha
        ranks.add((r, alpha))
        tensors.update({f"{PREFIX}{name}.{fmt.keys[k]}": v.reshape(fmt.shapes.get(k, v.shape)).contiguous()
                        for k, v in own.items()})
    first = att.targets[0]
    for k, key in fmt.shared.items():  # once per adapter; a non-persistent one is regenerated from the config
        if att.specs[first.name][k].persistent:
            tensors[key] = _full_cpu(getattr(first.layer, k)).contiguous()
    return tensors


def _native_config(model: nn.Module, group: list[tuple[Attachment, PeftFormat]], task_type, base_name) -> dict:
    """adapter_config.json of a non-LORA format: targets, the declared knobs and fixed entries."""
    every = [n for att, _ in group for n in att.target_names]
    targets = _target_modules(model, every)
    peft_type = group[0][1].peft_type
    config: dict[str, Any] = {
        "peft_type": peft_type, "task_type": task_type, "base_model_name_or_path": base_name,
        "target_modules": targets, "modules_to_save": None, "inference_mode": True,
    }
    # subset lists of this peft_type that no attachment fills are written empty (PEFT
    # would fill a missing one from its per-model defaults)
    for info in list_variants():
        fmt = _format_of(info)
        if fmt is not None and fmt.peft_type == peft_type and fmt.subset:
            config[fmt.subset] = []
    written: dict[str, str] = {}
    for att, fmt in group:
        entries = {key: getattr(att.cfg, knob) for knob, key in fmt.config_fields.items()}
        entries.update(fmt.config)
        if fmt.config_of is not None:  # knobs PEFT spells differently (MiSS: mode "balance" is init_weights=True)
            entries.update(fmt.config_of(att.cfg))
        if fmt.subset:
            listed = _target_modules(model, att.target_names)
            # full paths where leaves would not be a subset of target_modules, or PEFT's suffix
            # rule would also pick another attachment's module with them
            if (targets == list(every) and len(group) > 1
                    or {n for n in every if _peft_listed(listed, n)} != set(att.target_names)):
                listed = list(att.target_names)
            entries[fmt.subset] = listed
        for key, value in entries.items():
            if key in written and config[key] != value:
                raise PeftInteropError(
                    f"the {written[key]} and {att.variant.name} attachments need {key}={config[key]!r} and "
                    f"{value!r} in one {peft_type} adapter config; attach them with equal settings."
                )
            config[key], written[key] = value, att.variant.name
        if fmt.config_from is not None:
            config.update(fmt.config_from(att))
    return config


def _low_rank(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A`` the best rank-``rank`` approximation of ``delta`` (numerical
    rank at fp32 rounding when ``rank`` is None); at least rank 1 (PEFT needs r >= 1)."""
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tol = sv[0].item() * max(delta.shape) * torch.finfo(torch.float32).eps if sv.numel() else 0.0
    keep = int((sv > tol).sum()) if rank is None else min(rank, sv.numel())
    keep = max(keep, 1)
    root = sv[:keep].sqrt()
    return (root[:, None] * vh[:keep]).float(), (u[:, :keep] * root).float()


def _export_as_lora(model, att: Attachment, out: Path, rank: int | None, base_name, task_type) -> LoraExport:
    if not att.variant.mergeable:
        raise PeftInteropError(
            f"variant {att.variant.name!r} has no merge hook, so its weight delta is unknown; as_lora needs a "
            "mergeable variant."
        )
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise PeftInteropError(f"rank must be a positive integer or None, got {rank!r}.")
    hook = att.variant.hook("merge")
    tensors: Tensors = {}
    ranks: dict[str, int] = {}
    errors: list[float] = []
    bias_deltas: dict[str, torch.Tensor] = {}
    for t in att.targets:
        current = _full_cpu(dense_weight(t.layer)).float()
        bias = getattr(t.layer, "bias", None)
        bias = None if bias is None else _full_cpu(bias).float()
        with torch.no_grad():
            merged, merged_bias = hook(t.layer, current.clone(), None if bias is None else bias.clone())
        delta = merged.float() - _full_cpu(original_weight(t.layer)).float()  # against the untouched base
        a, b = _low_rank(delta, rank)
        scale = delta.abs().max().item()
        errors.append((b @ a - delta).abs().max().item() / scale if scale else 0.0)
        ranks[t.name] = a.shape[0]
        tensors[f"{PREFIX}{t.name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{t.name}.lora_B.weight"] = b.contiguous()
        if bias is not None and not torch.equal(merged_bias, bias):
            bias_deltas[t.name] = (merged_bias - bias).contiguous()
    if bias_deltas:  # PEFT's lora_bias: every lora_B gets a bias (zeros where the delta had none)
        for t in att.targets:
            tensors[f"{PREFIX}{t.name}.lora_B.bias"] = bias_deltas.get(t.name, torch.zeros(t.d_out))
    r = max(ranks.values())
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_name or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),  # scaling 1 everywhere
        "target_modules": _target_modules(model, att.target_names), "lora_dropout": 0.0, "bias": "none",
        "lora_bias": bool(bias_deltas), "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }
    err = max(errors)
    how = "its numerical rank (exact to fp32 rounding)" if rank is None else f"rank at most {rank} (truncated)"
    readme = (
        f"# PEFT LoRA export of a lora-lite {att.variant.name} adapter\n\n"
        f"Written by `lora_lite.export_peft(..., as_lora=True, rank={rank})`: each module's weight delta (the "
        f"{att.variant.name} adapter merged into the base weight, minus the base weight) as a LoRA of {how}.\n\n"
        f"- modules: {len(ranks)}; ranks: {min(ranks.values())} to {r}\n"
        f"- measured max relative error of the weight deltas, max |B A - delta| / max |delta|: {err:.3e}\n"
        f"- bias deltas (PEFT lora_bias): {'yes' if bias_deltas else 'none'}\n"
    )

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (out / "README.md").write_text(readme)

    _write_once(any(_is_sharded(v) for v in att.adapter_tensors().values()), write)
    return LoraExport(out, ranks, err)


def _target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names (``["q_proj", "v_proj"]``, what serving tools expect) when PEFT's suffix
    matching selects exactly the targets with them; full module paths otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
    selected = {n for n, _ in model.named_modules() if n and (n in leaves or any(n.endswith("." + x) for x in leaves))}
    return leaves if selected == set(targets) else list(targets)


# adapter_config.json entries that do not change what a LoRA adapter computes
_NEUTRAL = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "lora_dropout", "init_lora_weights", "runtime_config", "ephemeral_gpu_offload",
    # knobs of options that are off unless their switch (megatron_config, use_qalora) is set
    "megatron_core", "qalora_group_size",
    # knobs of data-driven inits, which PEFT ignores unless init_lora_weights names them; when it
    # does, the tensors hold what the init chose (eva), or the base-mutating check below refuses
    "eva_config", "corda_config", "lora_ga_config",
}
# PEFT's init_lora_weights values (its vocabulary) that rewrite the base weights
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _importer(cfg: dict[str, Any], path: Path) -> list[tuple[str, PeftFormat]]:
    """The installed variants whose declared formats read this adapter config: the main
    one first (the most specific match), then those declaring a ``subset`` of it."""
    found, near = [], []
    for info in list_variants():
        fmt = _format_of(info)
        if fmt is None or not fmt.reads or fmt.peft_type != cfg.get("peft_type"):
            continue
        # an absent entry reads as PEFT's default: LoraConfig's, or else the format's own value
        bad = {k: (cfg.get(k), v) for k, v in fmt.config.items() if cfg.get(k, _LORA_DEFAULTS.get(k, v)) != v}
        (near if bad else found).append((len(fmt.config), info.name, fmt, bad))
    main = [f for f in found if f[2].subset is None]
    if not main and cfg.get("peft_type") == "LORA":
        wanted = {k: cfg[k] for k in _LORA_DEFAULTS if cfg.get(k)}
        raise PeftInteropError(
            f"{path}: no installed variant reads a {cfg.get('peft_type')} adapter with {wanted or 'default options'}; "
            f"variants with a PEFT format: {_exportable()}. Install the plugin that declares it."
        )
    if not main and near:
        why = "; ".join(f"{name} reads {', '.join(f'{k}={v!r}' for k, (_, v) in bad.items())} only"
                        for _, name, _, bad in near)
        got = {k: g for *_, bad in near for k, (g, _) in bad.items()}
        raise PeftInteropError(
            f"{path}: no installed variant reads this {cfg.get('peft_type')} adapter with "
            f"{', '.join(f'{k}={v!r}' for k, v in got.items())}: {why}."
        )
    if not main:
        types = sorted({f.peft_type for f in (_format_of(v) for v in list_variants()) if f is not None})
        raise PeftInteropError(
            f"{path}: peft_type is {cfg.get('peft_type')!r}; the installed variants read PEFT adapters of types "
            f"{types} (variants with a PEFT format: {_exportable()}). Install the plugin that declares it."
        )
    _, name, fmt, _ = max(main, key=lambda f: (f[0], f[1]))  # the most specific declaration wins
    return [(name, fmt)] + sorted((f[1], f[2]) for f in found if f[2].subset is not None)


# adapter_config.json entries of any peft_type that do not change what an adapter computes
_NATIVE_NEUTRAL = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
}


def _check_native_config(cfg: dict[str, Any], path: Path, formats: list[tuple[str, PeftFormat]]) -> None:
    """A non-LORA config may hold only what its formats declare; anything else set refuses."""
    known = set(_NATIVE_NEUTRAL)
    for _, fmt in formats:
        known |= set(fmt.config_fields.values()) | set(fmt.config) | set(fmt.neutral) | {fmt.subset}
    for key, value in cfg.items():
        if key in known or not value:
            continue
        raise PeftInteropError(
            f"{path}: {key}={value!r} is not supported by the import of a {cfg.get('peft_type')} adapter as "
            f"{formats[0][0]} (it changes the adapter, or lora-lite cannot tell that it does not)."
        )


def _check_peft_config(cfg: dict[str, Any], path: Path, neutral: tuple[str, ...] = ()) -> None:
    if cfg.get("peft_type") != "LORA":
        raise PeftInteropError(f"{path}: peft_type is {cfg.get('peft_type')!r}; lora-lite imports PEFT LoRA adapters only.")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise PeftInteropError(f"{path}: adapter_config.json has no numeric {key!r}.")
    if cfg.get("bias", "none") != "none":
        raise PeftInteropError(f"{path}: bias={cfg['bias']!r} trains base biases, which lora-lite does not; "
                               "retrain with bias='none'.")
    init = cfg.get("init_lora_weights", True)
    declared = {f.config.get("init_lora_weights") for f in map(_format_of, list_variants()) if f is not None and f.reads}
    mutating = sorted(d for d in declared if isinstance(d, str) and d.lower().startswith(_MUTATING_INITS))
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS) and init not in declared:
        data = init.lower() in ("corda", "lora_ga")  # W_res from calibration data (covariances, a gradient)
        raise PeftInteropError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights"
            + (" from calibration data the file does not hold" if data else "")
            + ", so the tensors alone do not define the adapter. In PEFT, save it with "
            "path_initial_model_for_weight_conversion=... (a plain LoRA delta against the original weights) and "
            "import that."
            + (f" (Installed variants read init_lora_weights={mutating} only: a randomized SVD such as "
               "pissa_niter_* cannot be recomputed.)" if mutating and not data else "")
        )
    for key, value in cfg.items():
        if key in _NEUTRAL or key in neutral or key == "bias" or not value:
            continue
        raise PeftInteropError(
            f"{path}: {key}={value!r} is not supported by the import (it changes the adapter beyond plain LoRA, "
            "or lora-lite cannot tell that it does not). Supported: plain LoRA with one r and lora_alpha, "
            "optionally use_rslora."
        )


def _read_peft_dir(directory: Path) -> tuple[dict[str, Any], Tensors]:
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise PeftInteropError(f"{directory} has no {CONFIG_NAME}; it is not a PEFT adapter directory.")
    if not weights.is_file():
        raise PeftInteropError(
            f"{directory} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is never read: unpickling can run code). "
            "Re-save it with PEFT's save_pretrained(safe_serialization=True)."
        )
    cfg = json.loads(cfg_path.read_text())
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return cfg, tensors


def _selected_by_config(model: nn.Module, cfg: dict[str, Any]) -> set[str] | None:
    """The linear modules PEFT's target_modules/exclude_modules/layers_to_transform select, or
    None where the rule is beyond this check ("all-linear", layers_pattern)."""
    tm, ex, layers = cfg.get("target_modules"), cfg.get("exclude_modules"), cfg.get("layers_to_transform")
    if not tm or tm == "all-linear" or cfg.get("layers_pattern"):
        return None

    def hit(rule, name):
        if isinstance(rule, str):
            return re.fullmatch(rule, name) is not None
        return name in rule or any(name.endswith("." + x) for x in rule)

    layers = [layers] if isinstance(layers, int) else layers
    out = set()
    for name, _ in linear_like_modules(model):
        if ex and hit(ex, name) or not hit(tm, name):
            continue
        if layers and not isinstance(tm, str) and block_index(name) not in layers:
            continue
        out.add(name)
    return out


def import_peft(model: nn.Module, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Attachment:
    """Attach the PEFT adapter in ``directory`` as the installed variant whose declared
    :class:`PeftFormat` reads it (plain LoRA by the ``lora`` plugin, ``use_dora`` by ``dora``,
    ``IA3`` by ``ia3``, ``VERA`` by ``vera``, ...).

    Every tensor in the file must land on a target and every target must get its tensors;
    otherwise :class:`PeftInteropError` and the model is left as it was. A data-calibrated
    variant (EVA) is attached without calibration, as ``load`` does: the file holds what
    its calibration chose. ``dtype``: adapter
    storage dtype (default: the file's). ``use_rslora`` is folded into ``alpha``
    (``alpha * sqrt(r)``) so the scaling is the same, unless the format's ``knobs_of``
    reads it (and ``lora_dropout``) into the variant's own knobs. An adapter whose format
    splits into several attachments (IA3 with ``feedforward_modules``: ``ia3`` and
    ``ia3_ff``) attaches all of them and returns the main one; ``lora_lite.attachments(model)``
    lists them all.
    """
    path = Path(directory)
    cfg, tensors = _read_peft_dir(path)
    lora = cfg.get("peft_type") == "LORA"
    formats = None
    if lora:
        try:  # the reading format's `neutral` keys (EVA's rank_pattern); its refusal is raised below
            formats = _importer(cfg, path)
        except PeftInteropError:
            pass
        _check_peft_config(cfg, path, formats[0][1].neutral if formats else ())
    formats = formats or _importer(cfg, path)
    if not lora:
        _check_native_config(cfg, path, formats)
    variant, fmt = formats[0]
    suffix_to_name = {v: k for _, f in reversed(formats) for k, v in f.keys.items()}
    shared_keys = {key: (v, k) for v, f in formats for k, key in f.shared.items()}
    by_module: dict[str, Tensors] = {}
    shared: dict[str, Tensors] = {}
    for key, value in tensors.items():
        if key in shared_keys:
            owner, name = shared_keys[key]
            shared.setdefault(owner, {})[name] = value
            continue
        if not key.startswith(PREFIX):
            raise PeftInteropError(f"{path}: key {key!r} lacks PEFT's {PREFIX!r} prefix; PEFT would ignore it.")
        rest = key[len(PREFIX):]
        hit = next(((rest[: -len(s) - 1], n) for s, n in sorted(suffix_to_name.items(), key=lambda i: -len(i[0]))
                    if rest.endswith("." + s)), None)
        if hit is None or not hit[0]:
            raise PeftInteropError(
                f"{path}: tensor {key!r} is not a {variant} weight (expected suffixes {sorted(fmt.keys.values())})."
            )
        by_module.setdefault(hit[0], {})[hit[1]] = value
    # which variant holds each module: the first whose subset list names it, else the main one
    owner_of = {m: next((v for v, f in formats[1:] if _peft_listed(cfg.get(f.subset), m)), variant) for m in by_module}
    fmt_of = dict(formats)
    # optional tensors (LoKr's factor forms) and per-target copies of shared tensors (RandLoRA) may be absent
    incomplete = [m for m, t in by_module.items()
                  if not set(fmt_of[owner_of[m]].keys) - set(fmt_of[owner_of[m]].optional)
                  - set(fmt_of[owner_of[m]].shared) <= set(t)]
    if not by_module or incomplete:
        raise PeftInteropError(
            f"{path}: modules without all of {sorted(fmt.keys.values())}: {incomplete[:5] or 'no tensors at all'}."
        )
    selected = _selected_by_config(model, cfg)
    if selected is not None and selected != set(by_module):
        raise PeftInteropError(
            f"{path}: target_modules select {len(selected)} module(s) of this model but the file holds tensors for "
            f"{len(by_module)}; without tensors: {sorted(selected - set(by_module))[:5]}, not selected or not in "
            f"this model: {sorted(set(by_module) - selected)[:5]}. Is this the model the adapter was trained on?"
        )
    absent = sorted(set(by_module) - {n for n, _ in linear_like_modules(model)})
    if absent:
        raise PeftInteropError(f"{path}: {len(absent)} adapted module(s) are not linear layers of this model: {absent[:5]}.")
    stray = sorted(set(shared) - set(owner_of.values()))
    if stray:
        raise PeftInteropError(f"{path}: shared tensors of {stray} but no module of theirs.")
    for m in by_module:
        f = fmt_of[owner_of[m]]
        if f.read is not None:
            by_module[m] = f.read(cfg, m, by_module[m])
    configs = []
    for v, f in formats:
        modules = sorted(m for m in by_module if owner_of[m] == v)
        if not modules:
            continue
        # the adapter's float tensors set the dtype (an index tensor, SHiRA's int32 shira_indices, does not)
        storage = dtype or next((t.dtype for t in by_module[modules[0]].values() if t.is_floating_point()),
                                torch.float32)
        if lora:
            r = int(cfg["r"])
            knobs = {"r": r, "alpha": float(cfg["lora_alpha"]) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)}
        else:
            knobs = {knob: cfg[key] for knob, key in f.config_fields.items() if cfg.get(key) is not None}
        if f.knobs_of is not None:
            knobs.update(f.knobs_of(cfg))
        try:
            configs.append((v, f, modules, LoraLiteConfig(
                variant=v, dtype=storage, exclude_names=(), target_names=tuple(f"^{re.escape(m)}$" for m in modules),
                **knobs)))
        except ConfigError as err:
            raise PeftInteropError(f"{path}: the adapter config does not make a valid {v} config: {err}") from err
    attached: list[Attachment] = []
    try:
        for v, f, modules, config in configs:
            att = attach_for_load(model, config)  # no calibration: the file holds what it chose (EVA's A)
            attached.append(att)
            if f.optional:  # the tensors this layer holds, by its shape
                for t in att.targets:
                    want = set(att.specs[t.name]) & set(f.keys)
                    if set(by_module[t.name]) != want:
                        raise PeftInteropError(
                            f"{path}: {t.name} has {sorted(f.keys[k] for k in by_module[t.name])} in the file but "
                            f"{sorted(f.keys[k] for k in want)} here (r={att.cfg.r}, layer {t.d_in} -> {t.d_out})."
                        )
            with torch.no_grad():
                for t in att.targets:
                    for name, value in by_module[t.name].items():
                        if name in f.shared:  # PEFT's per-target copy of a shared tensor: must be that tensor
                            ref = shared.get(v, {}).get(name)
                            if ref is None and att.specs[t.name][name].persistent:
                                raise PeftInteropError(f"{path}: no {f.shared[name]!r} in the file, but the config "
                                                       "says it is saved (it is not regenerated from the config).")
                            if not att.specs[t.name][name].persistent or ref is None or not torch.equal(value, ref):
                                raise PeftInteropError(
                                    f"{path}: {t.name}.{f.keys[name]} is not a copy of {f.shared[name]!r} (PEFT saves "
                                    "the shared tensor under every target; the copies must equal the shared one, and "
                                    "exist only when the config saves it)."
                                )
                            continue
                        _copy_in(path, f"{t.name}.{name}", getattr(t.layer, name), value, f.shapes.get(name),
                                 f"r={att.cfg.r}, layer {t.d_in} -> {t.d_out}")
                first = att.targets[0]
                for name in f.shared:
                    persistent = att.specs[first.name][name].persistent
                    value = shared.get(v, {}).get(name)
                    if value is None and persistent:
                        raise PeftInteropError(f"{path}: no {f.shared[name]!r} in the file, but the config says it is "
                                               "saved (it is not regenerated from the config).")
                    if value is not None and not persistent:
                        raise PeftInteropError(f"{path}: {f.shared[name]!r} is in the file, but the config says it is "
                                               "regenerated from the config (PEFT refuses this file too).")
                    if value is not None:
                        _copy_in(path, f.shared[name], getattr(first.layer, name), value, None, f"r={att.cfg.r}, shared")
    except BaseException:
        for att in reversed(attached):
            att.detach()
        raise
    return attached[0]


def _copy_in(path: Path, what: str, param: torch.Tensor, value: torch.Tensor, peft_shape, detail: str) -> None:
    want = tuple(param.shape) if peft_shape is None else tuple(param.reshape(peft_shape).shape)
    if tuple(value.shape) != want:
        raise PeftInteropError(f"{path}: {what} has shape {tuple(value.shape)} in the file but {want} here ({detail}).")
    param.copy_(value.reshape(param.shape))


def _peft_listed(rule: Any, name: str) -> bool:
    """PEFT's IA3 feedforward_modules rule: a regex fully matching, or a suffix of the name."""
    if not rule:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name.endswith(x) for x in rule)


def _load_hf_model(name_or_path: str) -> nn.Module:
    # raises MissingDependencyError (no transformers) or ModelLoadError, both typed
    from .hf import load_causal_lm

    return load_causal_lm(name_or_path)


def _cli_export(args: argparse.Namespace) -> int:
    from ..checkpoint import load

    model = _load_hf_model(args.model)
    load(model, args.checkpoint)
    got = export_peft(model, args.output, as_lora=args.as_lora, rank=args.rank, base_model_name_or_path=args.model,
                      task_type="CAUSAL_LM")
    out = got.path if args.as_lora else got
    print(f"wrote PEFT adapter {out / CONFIG_NAME} and {out / WEIGHTS_NAME}"
          + (f" (LoRA of the weight deltas, max relative error {got.max_rel_error:.3e})" if args.as_lora else ""))
    return 0


def _cli_import(args: argparse.Namespace) -> int:
    model = _load_hf_model(args.model)
    att = import_peft(model, args.peft_dir)
    save(model, args.output)
    print(f"wrote lora-lite checkpoint {args.output} ({len(att)} targets, r={att.cfg.r})")
    return 0


def add_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export-peft`` and ``import-peft`` to a CLI's subparsers; each sets ``func(args) -> int``."""
    p = subparsers.add_parser("export-peft", help="convert a lora-lite checkpoint to a PEFT adapter directory")
    p.add_argument("checkpoint", help="lora-lite .safetensors checkpoint")
    p.add_argument("output", help="directory to write adapter_config.json + adapter_model.safetensors into")
    p.add_argument("--model", required=True, help="base model (transformers name or path) the adapter was trained on")
    p.add_argument("--as-lora", action="store_true", help="any mergeable variant as a plain LoRA (SVD of its weight deltas)")
    p.add_argument("--rank", type=int, default=None, help="with --as-lora: truncate to this rank (default: exact)")
    p.set_defaults(func=_cli_export)
    p = subparsers.add_parser(
        "import-peft",
        help="convert a PEFT adapter directory (LoRA, or a native PEFT format an installed variant declares; "
             "see docs/peft-interop.md) to a lora-lite checkpoint",
    )
    p.add_argument("peft_dir", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output", help="lora-lite .safetensors checkpoint to write")
    p.add_argument("--model", required=True, help="base model (transformers name or path) the adapter belongs to")
    p.set_defaults(func=_cli_import)


__all__ = ["LoraExport", "PeftFormat", "add_cli_commands", "export_peft", "import_peft"]
