"""Which layers get an adapter: structural detection, roles, name and layer filters.

A layer is *linear-like* if a registered layer kind knows it, or it has integer
``in_features``/``out_features`` and a ``weight``. Its roles come from its shape against
the model width ``d_model``: a *reader* takes ``d_model`` in, a *writer* gives ``d_model``
out (a square ``d_model`` layer is both), an *inner* layer does neither. Roles never
depend on names, so unfamiliar architectures (BERT ``query``, T5 ``q``, GPT-NeoX
``query_key_value``) classify without special cases, and names are there to filter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import LoraLiteConfig
from .errors import TargetingError
from .weights import _HOST_ATTR, features, host_layer, layer_kind, looks_linear

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|block|blocks)\.(\d+)(?:\.|$)")


@dataclass
class Target:
    """One layer that gets an adapter."""

    name: str
    layer: nn.Module
    roles: frozenset[str]
    d_in: int
    d_out: int
    block: int | None

    @property
    def host(self) -> nn.Module:
        """The module the model actually calls: ``layer`` itself, or, when this attachment is
        stacked on a layer that already has one, the layer its adapter slot sits on. Register
        temporary hooks (calibration) here, not on ``layer``."""
        return host_layer(self.layer)


def block_index(name: str) -> int | None:
    """Transformer block index parsed from a module path (``model.layers.3.mlp`` -> 3)."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def infer_d_model(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> int:
    """Model width: ``config.hidden_size`` / ``d_model`` / ``n_embd`` if present, else the
    input-embedding width, else the most common linear-layer dimension."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except NotImplementedError:
            emb = None
        dim = getattr(emb, "embedding_dim", None)
        if isinstance(dim, int):
            return dim
    counts: Counter[int] = Counter()
    for _, layer in linears:
        d_in, d_out = features(layer)
        counts[d_in] += 1
        counts[d_out] += 1
    if not counts:
        raise TargetingError(f"{type(model).__name__} contains no linear-like modules to adapt.")
    return counts.most_common(1)[0][0]


def roles_of(d_in: int, d_out: int, d_model: int) -> frozenset[str]:
    roles = set()
    if d_in == d_model:
        roles.add("reader")
    if d_out == d_model:
        roles.add("writer")
    return frozenset(roles or {"inner"})


def linear_like_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return _classified(model)[0]


def _classified(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module, Any]]]:
    """One walk, one ``layer_kind`` per module: the linear-like modules, and the modules of a
    ``by_name_only`` kind (embeddings, convolutions) with their kind."""
    linears, named_only = [], []
    for name, m in model.named_modules():
        if not name or _HOST_ATTR in m.__dict__:
            continue
        kind = layer_kind(m)
        if kind is not None and kind.by_name_only:
            named_only.append((name, m, kind))
        elif kind is not None or looks_linear(m):
            linears.append((name, m))
    return linears, named_only


def find_targets(model: nn.Module, cfg: LoraLiteConfig) -> list[Target]:
    """Apply ``cfg``'s roles and filters; raise :class:`TargetingError` if nothing matches."""
    linears, named_only = _classified(model)
    d_model = infer_d_model(model, linears)
    wanted_roles = set(cfg.target_roles) or {"reader", "writer", "inner"}
    tied, uncalled = _special_ids(model)
    exclude = [re.compile(p) for p in cfg.exclude_names]
    include = [re.compile(p) for p in cfg.target_names]
    targets = []
    for name, layer in linears:  # cheap name tests first: most layers stop there
        if any(p.search(name) for p in exclude):
            continue
        named = any(p.search(name) for p in include)
        if include and not named:
            continue
        block = block_index(name)
        if cfg.layers is not None and block not in cfg.layers:
            continue
        if id(getattr(layer, "weight", None)) in tied and not named:
            continue  # an output head sharing the input embeddings' tensor (BERT's cls...decoder)
        d_in, d_out = features(layer)
        roles = roles_of(d_in, d_out, d_model)
        if not roles & wanted_roles:
            continue
        targets.append(Target(name, layer, roles, d_in, d_out, block))
    if include:
        targets += _named_only_targets(named_only, cfg, include, exclude)
    _refuse_uncalled(targets, uncalled)
    if not targets:
        hidden = [n for n, _ in model.named_modules()
                  if include and any(p.search(n) for p in include) and any(p.search(n) for p in exclude)]
        hint = (f"\ntarget_names matches {hidden[:5]}, but exclude_names={cfg.exclude_names} removes them (the "
                "default excludes lm_head and embed_tokens): pass exclude_names=() to target them.") if hidden else ""
        raise TargetingError(_no_match_message(cfg, linears, d_model) + hint)
    return targets


def _named_only_targets(named_only, cfg: LoraLiteConfig, include, exclude) -> list[Target]:
    """Embeddings and convolutions (kinds that are ``by_name_only``): targets only when a
    ``target_names`` pattern names them; they have no roles."""
    out = []
    for name, layer, kind in named_only:
        if any(p.search(name) for p in exclude) or not any(p.search(name) for p in include):
            continue
        block = block_index(name)
        if cfg.layers is not None and block not in cfg.layers:
            continue
        d_in, d_out = kind.features(layer)
        out.append(Target(name, layer, frozenset(), d_in, d_out, block))
    return out


def _special_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """One walk for two kinds of layers targeting treats apart:

    - ids of input-embedding weights. A linear holding one of them is a tied output head:
      like ``lm_head`` it is skipped unless ``target_names`` names it, because a variant
      that rewrites its weight (PiSSA) would rewrite the embeddings too;
    - ids of linears their parent reads without calling (``nn.MultiheadAttention``'s
      ``out_proj``, whose weight ``F.multi_head_attention_forward`` uses directly).
    """
    tied, uncalled = set(), set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            tied.add(id(m.weight))
        elif isinstance(m, nn.MultiheadAttention):
            uncalled.add(id(m.out_proj))
    return tied, uncalled


def _refuse_uncalled(targets: list[Target], uncalled: set[int]) -> None:
    """A hook on a layer that is never called would never run: the adapter would
    silently do nothing."""
    bad = [t.name for t in targets if id(t.layer) in uncalled]
    if bad:
        raise TargetingError(
            f"{len(bad)} selected layer(s) are never called as modules (first: {bad[0]}): nn.MultiheadAttention "
            "computes with out_proj.weight directly, so a hook adapter on it would never run. Keep them out "
            "with exclude_names=[r'out_proj$'] (or narrow target_names / target_roles)."
        )


def _no_match_message(cfg: LoraLiteConfig, linears: list[tuple[str, nn.Module]], d_model: int) -> str:
    if not linears:
        return "the model has no linear-like modules (in_features, out_features, weight) to adapt."
    shown = []
    for name, layer in linears[:40]:
        d_in, d_out = features(layer)
        shown.append(f"  {name}: {type(layer).__name__}({d_in} -> {d_out}) roles={sorted(roles_of(d_in, d_out, d_model))}")
    more = f"\n  ... and {len(linears) - 40} more" if len(linears) > 40 else ""
    return (
        f"no layer matched target_roles={cfg.target_roles} target_names={cfg.target_names} "
        f"exclude_names={cfg.exclude_names} layers={cfg.layers} (d_model={d_model}). "
        "Linear-like modules in this model:\n" + "\n".join(shown) + more +
        "\nAdjust target_names (regex on these paths), target_roles or layers."
    )
