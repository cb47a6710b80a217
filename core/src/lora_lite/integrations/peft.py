"""PEFT-format adapters in and out: ``export_peft`` / ``import_peft`` (peft itself not needed).

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.lora_A.weight``
``(r, d_in)`` and ``.lora_B.weight`` ``(d_out, r)``; PEFT adds
``scaling * B A x`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
That is lora-lite's ``lora`` variant term for term, so both directions are exact.

Core knows no variant by name: a variant declares its format as ``peft = PeftFormat(...)``
(which adapter tensor becomes which PEFT key, config entries that identify it, and an
optional ``convert`` for variants PEFT stores differently, e.g. PiSSA's rank-``2r`` delta
against the original weight); export and import read that declaration.

Anything that would change the math (another variant, ``rank_pattern``, a trained bias,
``modules_to_save``, a base-mutating init, missing or extra tensors) raises
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
from ..runtime import Attachment, attach, attachments
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
        variant PEFT stores differently (export only: such a format is never chosen on
        import); ``None`` copies the tensors as they are, both ways.
    :param peft_type: PEFT's ``peft_type`` (``"LORA"``).
    :param config_of: ``cfg -> adapter_config.json entries`` that depend on the variant's
        knobs (``{"use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout}``), written on
        export after ``config``.
    :param knobs_of: ``adapter_config.json -> LoraLiteConfig keyword arguments`` for import:
        they override the ``r`` / ``alpha`` core derives (``use_rslora`` folded into
        ``alpha``) and set the variant's knobs (``{"alpha": ..., "use_rslora": True}``).
    :param importable: whether import may choose this format; ``None`` (default): only when
        ``convert`` is ``None``. ``True`` for a variant whose ``convert`` rewrites only some
        configurations (an init that changed the base weight) and whose files are otherwise
        plain tensors.
    """

    keys: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[nn.Module, LoraLiteConfig, Tensors], tuple[Tensors, int, float]] | None = None
    peft_type: str = "LORA"
    config_of: Callable[[LoraLiteConfig], dict[str, Any]] | None = None
    knobs_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    importable: bool | None = None

    @property
    def reads(self) -> bool:
        """Whether ``import_peft`` may read files with this format."""
        return self.convert is None if self.importable is None else self.importable


# PEFT's LoraConfig defaults for the entries a format may use to identify itself
_LORA_DEFAULTS = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False}


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
    att = _single_attachment(model)
    if as_lora:
        return _export_as_lora(model, att, Path(directory), rank, base_model_name_or_path, task_type)
    if rank is not None:
        raise PeftInteropError("rank= truncates an as_lora export; pass as_lora=True with it.")
    fmt = _format_of(att.variant)
    if fmt is None:
        raise PeftInteropError(
            f"variant {att.variant.name!r} declares no PEFT format; installed variants that do: {_exportable()}."
        )
    tensors: Tensors = {}
    ranks = set()
    sharded = any(_is_sharded(v) for v in att.adapter_tensors().values())
    for name, layer in ((t.name, t.layer) for t in att.targets):
        own = {k: _full_cpu(getattr(layer, k)) for k in att.specs[name]}
        if set(own) != set(fmt.keys):
            raise PeftInteropError(
                f"{name} holds adapter tensors {sorted(own)} but the {att.variant.name} PEFT format maps "
                f"{sorted(fmt.keys)}; the variant's `peft` declaration is out of date."
            )
        if fmt.convert is not None:
            own, r, alpha = fmt.convert(layer, att.cfg, own)
        else:
            r, alpha = att.cfg.r, att.cfg.alpha
        ranks.add((r, alpha))
        tensors.update({f"{PREFIX}{name}.{fmt.keys[k]}": v.contiguous() for k, v in own.items()})
    (r, alpha), = ranks
    config = {
        "peft_type": fmt.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
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
}
# PEFT's init_lora_weights values (its vocabulary) that rewrite the base weights
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _importer(cfg: dict[str, Any], path: Path) -> tuple[str, PeftFormat]:
    """The installed variant whose declared format reads this adapter config."""
    found = []
    for info in list_variants():
        fmt = _format_of(info)
        if fmt is None or not fmt.reads or fmt.peft_type != cfg.get("peft_type"):
            continue
        if all(cfg.get(k, _LORA_DEFAULTS.get(k)) == v for k, v in fmt.config.items()):
            found.append((len(fmt.config), info.name, fmt))
    if not found:
        wanted = {k: cfg[k] for k in _LORA_DEFAULTS if cfg.get(k)}
        raise PeftInteropError(
            f"{path}: no installed variant reads a {cfg.get('peft_type')} adapter with {wanted or 'default options'}; "
            f"variants with a PEFT format: {_exportable()}. Install the plugin that declares it."
        )
    _, name, fmt = max(found, key=lambda f: (f[0], f[1]))  # the most specific declaration wins
    return name, fmt


def _check_peft_config(cfg: dict[str, Any], path: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise PeftInteropError(f"{path}: peft_type is {cfg.get('peft_type')!r}; lora-lite imports PEFT LoRA adapters only.")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise PeftInteropError(f"{path}: adapter_config.json has no numeric {key!r}.")
    if cfg.get("bias", "none") != "none":
        raise PeftInteropError(f"{path}: bias={cfg['bias']!r} trains base biases, which lora-lite does not; "
                               "retrain with bias='none'.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise PeftInteropError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so the tensors alone do not define the "
            "adapter. In PEFT, save it with path_initial_model_for_weight_conversion=... (a plain LoRA delta) and "
            "import that."
        )
    for key, value in cfg.items():
        if key in _NEUTRAL or key == "bias" or not value:
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
    :class:`PeftFormat` reads it (plain LoRA by the ``lora`` plugin, ``use_dora`` by ``dora``).

    Every tensor in the file must land on a target and every target must get its tensors;
    otherwise :class:`PeftInteropError` and the model is left as it was. ``dtype``: adapter
    storage dtype (default: the file's). ``use_rslora`` is folded into ``alpha``
    (``alpha * sqrt(r)``) so the scaling is the same, unless the format's ``knobs_of``
    reads it (and ``lora_dropout``) into the variant's own knobs.
    """
    path = Path(directory)
    cfg, tensors = _read_peft_dir(path)
    _check_peft_config(cfg, path)
    variant, fmt = _importer(cfg, path)
    suffix_to_name = {v: k for k, v in fmt.keys.items()}
    by_module: dict[str, Tensors] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise PeftInteropError(f"{path}: key {key!r} lacks PEFT's {PREFIX!r} prefix; PEFT would ignore it.")
        module, _, suffix = key[len(PREFIX):].rpartition(".lora_")
        name = suffix_to_name.get("lora_" + suffix)
        if not module or name is None:
            raise PeftInteropError(
                f"{path}: tensor {key!r} is not a {variant} weight (expected suffixes {sorted(fmt.keys.values())})."
            )
        by_module.setdefault(module, {})[name] = value
    incomplete = [m for m, t in by_module.items() if set(t) != set(fmt.keys)]
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
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)
    storage = dtype or next(iter(next(iter(by_module.values())).values())).dtype
    kwargs: dict[str, Any] = dict(
        variant=variant, r=r, alpha=alpha, dtype=storage, exclude_names=(),
        target_names=tuple(f"^{re.escape(m)}$" for m in sorted(by_module)),
    )
    if fmt.knobs_of is not None:
        kwargs.update(fmt.knobs_of(cfg))
    try:
        config = LoraLiteConfig(**kwargs)
    except ConfigError as err:
        raise PeftInteropError(f"{path}: adapter_config.json gives an invalid {variant} config: {err}") from err
    absent = sorted(set(by_module) - {n for n, _ in linear_like_modules(model)})
    if absent:
        raise PeftInteropError(f"{path}: {len(absent)} adapted module(s) are not linear layers of this model: {absent[:5]}.")
    att = attach(model, config)
    try:
        with torch.no_grad():
            for t in att.targets:
                for name, value in by_module[t.name].items():
                    param = getattr(t.layer, name)
                    if tuple(value.shape) != tuple(param.shape):
                        raise PeftInteropError(
                            f"{path}: {t.name}.{name} has shape {tuple(value.shape)} in the file but "
                            f"{tuple(param.shape)} here (r={r}, layer {t.d_in} -> {t.d_out})."
                        )
                    param.copy_(value)
    except BaseException:
        att.detach()
        raise
    return att


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
    p = subparsers.add_parser("import-peft", help="convert a PEFT LoRA adapter directory to a lora-lite checkpoint")
    p.add_argument("peft_dir", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output", help="lora-lite .safetensors checkpoint to write")
    p.add_argument("--model", required=True, help="base model (transformers name or path) the adapter belongs to")
    p.set_defaults(func=_cli_import)


__all__ = ["LoraExport", "PeftFormat", "add_cli_commands", "export_peft", "import_peft"]
