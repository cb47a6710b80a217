"""The variant registry: entry-point discovery (lazy), registration checks, broken-plugin isolation.

Variants are found in the entry-point group ``lora_lite.variants`` (one entry point per
variant, named as the variant, pointing at its class or module) and through
``@lora_lite.register`` for notebooks. Discovery is lazy: ``LoraLiteConfig(variant="x")``
imports only the entry point named ``x``; listing (``list_variants``, ``broken_plugins``,
``lora-lite variants``) imports them all. A plugin that fails to import or to validate is
recorded with its distribution, version and error and skipped; everything else keeps working.

A variant is read once, here, into a :class:`VariantInfo`: its hooks (plain functions named
as the contract's hooks; ``@staticmethod`` and ``@lora_lite.hookimpl`` are accepted, not
needed) and the metadata core reads instead of knowing variants by name (layer kinds, PEFT
format, size knob, learning rates). Registration refuses, with a :class:`PluginError` that
names the plugin and what to change, anything that would fail later or silently: a hook
written as a method (``self``), a config class that is not a dataclass, a knob without a
default, names that disagree.

Environment variables (read at discovery):

``LORA_LITE_PLUGINS``
    comma-separated entry-point or distribution names to load; unset = all, empty = none.
``LORA_LITE_DISABLE_PLUGINS``
    comma-separated entry-point or distribution names never to load.

A variant left out this way is never imported; asking for it raises
:class:`UnknownVariantError` naming the variable that hid it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import config as _config
from . import hookspecs
from .config import LoraLiteConfig
from .errors import PluginError, UnknownVariantError

ENTRY_POINT_GROUP = "lora_lite.variants"
HOOK_NAMES = hookspecs.HOOK_NAMES
_REQUIRED = ("param_specs",)
_ONE_OF = ("forward", "forward_input")
# learning rates a comparison sweeps when the variant declares none (LoRA-like magnitudes)
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


@dataclass
class VariantInfo:
    """A registered variant: its plugin object, config class, hooks and declared metadata.

    :param layer_kinds: names of the layer kinds (:func:`lora_lite.layer_kinds`) the
        variant supports, or ``None`` for every linear-like kind. Attach refuses other
        kinds with a :class:`TargetingError` before touching the model.
    :param peft: a :class:`lora_lite.PeftFormat` (how the variant reads and writes PEFT
        adapters), or ``None``.
    :param size_knob: the integer config field that sets the adapter's size (``r`` for
        most), for budget-matched comparisons; ``None`` where the layer shapes fix the
        size (IA3's gates).
    :param lrs: learning rates a comparison sweeps by default.
    :param additive: (or a function ``cfg -> bool`` when it depends on the config: LoRA with
        an init that rewrites the weight is not) the variant only adds ``delta(x)`` to the base output (a ``forward``
        hook ``y + delta(x)``, no input transform, no rewritten weight): rows of a batch
        may then use different attachments (``lora_lite.adapter_batch``).
    :param merged_forward: the variant's delta is a dense weight (SHiRA, FourierFT): on a
        dense linear layer (``nn.Linear``, GPT-2's ``Conv1D``) where it is the first
        attachment, core runs the layer as ``F.linear(x, *merge(layer, W, b))``, one matmul
        on the merged weight, instead of the base matmul plus a ``forward`` hook adding
        ``x dW^T``; elsewhere (quantized layers, stacked attachments, mixed batches) the
        ``forward`` hook runs. Needs a ``merge`` hook that is differentiable in the adapter
        tensors and returns the weight in the layer's dtype.
    """

    name: str
    plugin: Any
    config_class: type[LoraLiteConfig]
    distribution: str | None
    version: str | None
    module: str
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    layer_kinds: tuple[str, ...] | None = None
    peft: Any = None
    size_knob: str | None = "r"
    lrs: tuple[float, ...] = DEFAULT_LRS
    additive: bool | Callable[[LoraLiteConfig], bool] = False
    merged_forward: bool = False

    def is_additive(self, cfg: LoraLiteConfig) -> bool:
        """Whether an attachment with ``cfg`` only adds ``delta(x)`` (``additive`` may depend on the config)."""
        return bool(self.additive(cfg)) if callable(self.additive) else self.additive

    def hook(self, name: str) -> Callable[..., Any] | None:
        return self.hooks.get(name)

    @property
    def mergeable(self) -> bool:
        """Whether the variant can fold itself into the base weight (it has a ``merge`` hook)."""
        return "merge" in self.hooks


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded or validated."""

    name: str
    distribution: str | None
    version: str | None
    error: str
    group: str = ENTRY_POINT_GROUP


_PLAIN_HOOK = {"wrapper": False, "hookwrapper": False, "optionalhook": False, "tryfirst": False,
               "trylast": False, "specname": None}


class _PluginManager(pluggy.PluginManager):
    """pluggy, but a function named as a contract hook is a hook without ``@hookimpl``."""

    def parse_hookimpl_opts(self, plugin: Any, name: str):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in HOOK_NAMES and callable(getattr(plugin, name, None)):
            return dict(_PLAIN_HOOK)
        return opts


class _Registry:
    def __init__(self) -> None:
        self.pm = _PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.variants: dict[str, VariantInfo] = {}
        self.broken: list[BrokenPlugin] = []
        # entry-point name -> why it was not loaded (an environment variable)
        self.skipped: dict[str, str] = {}
        # entry-point name -> (entry point, distribution, version), not imported yet
        self.pending: dict[str, tuple[Any, str | None, str | None]] | None = None


_registry = _Registry()


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _bind(impl: pluggy.HookImpl, spec_args: tuple[str, ...]) -> Callable[..., Any]:
    """Return a callable taking the spec's arguments positionally.

    pluggy lets an implementation accept a subset of the spec's arguments; the runtime
    calls hooks positionally, so such an implementation gets a thin adapter. The common
    case (all arguments, spec order) is the plugin's own function, untouched.
    """
    fn = impl.function
    if tuple(impl.argnames) == spec_args:
        return fn
    positions = [spec_args.index(a) for a in impl.argnames]
    return lambda *args: fn(*(args[i] for i in positions))


# -- registration checks: everything that would otherwise fail late or silently ------------

def _check_methods(plugin: Any, name: str) -> None:
    """A hook written ``def forward(self, layer, x, y)`` in a class registers (pluggy drops
    ``self``) and then fails at attach with a raw TypeError: refuse it now."""
    if not inspect.isclass(plugin):
        return
    for hook in HOOK_NAMES:
        raw = inspect.getattr_static(plugin, hook, None)
        if inspect.isfunction(raw):
            first = next(iter(inspect.signature(raw).parameters), None)
            if first in ("self", "cls"):
                raise PluginError(
                    f"variant {name!r}: hook {hook}({first}, ...) is written as a method, but core calls hooks on "
                    f"the class with the contract's arguments only. Drop the {first!r} parameter "
                    f"(e.g. def {hook}({', '.join(hookspecs.spec_args(hook))}))."
                )


def _check_config_class(config_class: Any, name: str) -> None:
    if not (isinstance(config_class, type) and issubclass(config_class, LoraLiteConfig)):
        raise PluginError(
            f"variant {name!r}: config_class must be a dataclass subclass of lora_lite.LoraLiteConfig, "
            f"got {config_class!r}."
        )
    if config_class is LoraLiteConfig:
        return
    if "__dataclass_fields__" not in vars(config_class):
        raise PluginError(
            f"variant {name!r}: config_class {config_class.__name__} is not decorated with @dataclass, so its "
            "knobs would silently not be fields (unknown to the config, never saved). Add @dataclass above it."
        )
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    no_default = [n for n, f in fields.items()
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if no_default:
        raise PluginError(
            f"variant {name!r}: knob(s) {no_default} of {config_class.__name__} have no default; every knob needs "
            "one (LoraLiteConfig(variant=...) must work with only the shared fields)."
        )
    if fields["variant"].default != name:
        raise PluginError(
            f"variant {name!r}: {config_class.__name__}.variant defaults to {fields['variant'].default!r}; "
            f"declare `variant: str = {name!r}` so the config and the variant agree."
        )


def _metadata(plugin: Any, name: str, config_class: type[LoraLiteConfig]) -> dict[str, Any]:
    """The optional declarations core reads (see :class:`VariantInfo`), checked."""
    kinds = getattr(plugin, "layer_kinds", None)
    if kinds is not None:
        if isinstance(kinds, str) or not all(isinstance(k, str) and k for k in kinds):
            raise PluginError(f"variant {name!r}: layer_kinds must be a tuple of layer-kind names, got {kinds!r}.")
        kinds = tuple(kinds)
    size_knob = getattr(plugin, "size_knob", "r")
    knob = {f.name: f for f in dataclasses.fields(config_class)}.get(size_knob)
    if size_knob is not None and (knob is None or not isinstance(knob.default, int) or isinstance(knob.default, bool)):
        raise PluginError(
            f"variant {name!r}: size_knob {size_knob!r} must name an integer field of {config_class.__name__} "
            f"(or be None for a variant whose size is fixed by the layer shapes)."
        )
    lrs = getattr(plugin, "lrs", DEFAULT_LRS)
    if isinstance(lrs, (int, float)) or not lrs or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v) for v in lrs
    ):
        raise PluginError(f"variant {name!r}: lrs must be a non-empty tuple of positive learning rates, got {lrs!r}.")
    additive = getattr(plugin, "additive", False)
    if not isinstance(additive, bool) and not callable(additive):
        raise PluginError(f"variant {name!r}: additive must be True, False or a function of the config, got {additive!r}.")
    merged_forward = getattr(plugin, "merged_forward", False)
    if not isinstance(merged_forward, bool):
        raise PluginError(f"variant {name!r}: merged_forward must be True or False, got {merged_forward!r}.")
    return {"layer_kinds": kinds, "peft": getattr(plugin, "peft", None), "size_knob": size_knob,
            "lrs": tuple(float(v) for v in lrs), "additive": additive, "merged_forward": merged_forward}


def _hooks(plugin: Any, name: str) -> dict[str, Callable[..., Any]]:
    """Register ``plugin`` with pluggy (signature validation) and resolve its hook functions."""
    pm = _registry.pm
    try:
        pm.register(plugin, name=f"lora_lite.variant.{name}")
    except pluggy.PluginValidationError as err:
        specs = ", ".join(f"{h}({', '.join(hookspecs.spec_args(h))})" for h in HOOK_NAMES)
        raise PluginError(
            f"variant {name!r} has a hook that does not match the contract: {err}. Fix its signature: a hook "
            f"may take a subset of its spec's arguments and no others; the specs are {specs}."
        ) from err
    unknown = [hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
    if unknown:
        pm.unregister(plugin)
        raise PluginError(f"variant {name!r} implements unknown hook(s) {unknown}; the contract's hooks are {HOOK_NAMES}.")
    hooks: dict[str, Callable[..., Any]] = {}
    for hook_name in HOOK_NAMES:
        caller = getattr(pm.hook, hook_name)
        spec_args = tuple(caller.spec.argnames)
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                hooks[hook_name] = _bind(impl, spec_args)
    if not all(h in hooks for h in _REQUIRED) or not any(h in hooks for h in _ONE_OF):
        pm.unregister(plugin)
        near = {a: difflib.get_close_matches(a, HOOK_NAMES, n=1)[0] for a in dir(plugin) if not a.startswith("_")
                and a not in HOOK_NAMES and difflib.get_close_matches(a, HOOK_NAMES, n=1, cutoff=0.8)}
        hint = "".join(f" {a!r} looks like a misspelt {h!r}." for a, h in near.items())
        raise PluginError(
            f"variant {name!r} must implement {list(_REQUIRED)} and one of {list(_ONE_OF)} (functions with those "
            f"names on the class or module); it implements {sorted(hooks)}.{hint}"
        )
    return hooks


def _register(plugin: Any, *, distribution: str | None, version: str | None, replace: bool,
              entry_point: str | None = None) -> VariantInfo:
    name = getattr(plugin, "name", None) if entry_point is None else getattr(plugin, "name", entry_point)
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(
            f"plugin {plugin!r} has no valid `name` attribute (got {name!r}); give the variant class "
            "a string identifier, e.g. name = 'myvariant'."
        )
    if entry_point is not None and name != entry_point:
        raise PluginError(
            f"the entry point {entry_point!r} of {distribution} loads a variant named {name!r}; the two must "
            f"agree: rename the entry point to {name!r} (users ask for it by that name) or drop `name` from the class."
        )
    config_class = getattr(plugin, "config_class", LoraLiteConfig)
    _check_config_class(config_class, name)
    _check_methods(plugin, name)
    meta = _metadata(plugin, name, config_class)
    if name in _registry.variants:
        existing = _registry.variants[name]
        if not replace and existing.distribution is not None:
            raise PluginError(
                f"variant {name!r} is already provided by {existing.distribution} {existing.version}; "
                "pass replace=True to override it in this process."
            )
        _unregister(name)
    hooks = _hooks(plugin, name)
    if meta["merged_forward"] and not {"merge", "forward"} <= set(hooks):
        _registry.pm.unregister(plugin)
        raise PluginError(
            f"variant {name!r} declares merged_forward but lacks a {'merge' if 'merge' not in hooks else 'forward'} "
            "hook: the merged-weight forward runs `merge`, and `forward` serves the layers it cannot (quantized, "
            "stacked, mixed batches)."
        )
    module = plugin.__name__ if inspect.ismodule(plugin) else getattr(plugin, "__module__", "?")
    info = VariantInfo(name, plugin, config_class, distribution, version, module, hooks, **meta)
    _registry.variants[name] = info
    return info


def _unregister(name: str) -> None:
    info = _registry.variants.pop(name)
    _registry.pm.unregister(info.plugin)


# -- discovery -------------------------------------------------------------------------------

def _scan() -> dict[str, tuple[Any, str | None, str | None]]:
    """Entry points by name, filtered by the environment variables; nothing imported."""
    if _registry.pending is not None:
        return _registry.pending
    only = _env_names("LORA_LITE_PLUGINS")
    disabled = _env_names("LORA_LITE_DISABLE_PLUGINS") or set()
    pending = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        names = {ep.name, dist}
        where = f"{dist} {version}"
        if names & disabled:
            _registry.skipped[ep.name] = (
                f"installed ({where}) but disabled by LORA_LITE_DISABLE_PLUGINS="
                f"{os.environ['LORA_LITE_DISABLE_PLUGINS']!r}; remove {ep.name!r} from that variable to use it"
            )
        elif only is not None and not names & only:
            _registry.skipped[ep.name] = (
                f"installed ({where}) but not selected by LORA_LITE_PLUGINS={os.environ['LORA_LITE_PLUGINS']!r}; "
                f"add {ep.name!r} to that variable, or unset it to load every installed plugin"
            )
        else:
            pending[ep.name] = (ep, dist, version)
    _registry.pending = pending
    return pending


def _load(name: str) -> None:
    """Import and register the entry point called ``name`` (once); a failure is recorded."""
    entry = _scan().pop(name, None)
    if entry is None or name in _registry.variants:  # an in-process registration shadows it
        return
    ep, dist, version = entry
    try:
        _register(ep.load(), distribution=dist or "?", version=version, replace=False, entry_point=ep.name)
    except Exception as err:  # isolation: one broken plugin must not hide the others
        _registry.broken.append(BrokenPlugin(ep.name, dist, version, f"{type(err).__name__}: {err}"))


def _load_all() -> None:
    for name in list(_scan()):
        _load(name)


def register(plugin: Any = None, *, replace: bool = False) -> Any:
    """Register a variant in this process (notebooks, tests). Usable as a decorator.

    Re-registering a name that was registered in-process replaces it silently (re-run
    notebook cells); shadowing an installed distribution's variant needs ``replace=True``.
    """

    def _do(p: Any) -> Any:
        _load(getattr(p, "name", None) or "")  # an installed variant of that name is shadowed knowingly
        _register(p, distribution=None, version=None, replace=replace)
        return p

    return _do if plugin is None else _do(plugin)


def unregister(name: str) -> None:
    """Remove a variant registered with :func:`register`."""
    if name not in _registry.variants:
        raise UnknownVariantError(f"no variant named {name!r} is registered.")
    _unregister(name)


def _install_hint(name: str) -> str:
    return (f"If it is published, install the distribution that provides it (by convention "
            f"`pip install lora-lite-{name.replace('_', '-')}`; one distribution may provide several variants).")


def get_variant(name: str) -> VariantInfo:
    """The variant called ``name`` (importing only its plugin), or an error that lists what is
    installed and what to install."""
    info = _registry.variants.get(name)
    if info is not None:
        return info
    _load(name)
    info = _registry.variants.get(name)
    if info is not None:
        return info
    if name in _registry.skipped:
        raise UnknownVariantError(f"variant {name!r} is {_registry.skipped[name]}.")
    for broken in _registry.broken:
        if broken.name == name:
            raise UnknownVariantError(
                f"variant {name!r} is installed ({broken.distribution} {broken.version}) but failed to load: "
                f"{broken.error}. Reinstall or fix that plugin (lora_lite.broken_plugins() lists every failure)."
            )
    _load_all()
    installed = sorted(_registry.variants) or ["none"]
    raise UnknownVariantError(f"unknown variant {name!r}. Installed variants: {', '.join(installed)}. {_install_hint(name)}")


def list_variants() -> list[VariantInfo]:
    """Every registered variant (imports every installed plugin)."""
    _load_all()
    return [_registry.variants[k] for k in sorted(_registry.variants)]


def broken_plugins() -> list[BrokenPlugin]:
    """Every installed plugin that failed to load, with its error (imports every plugin)."""
    _load_all()
    return list(_registry.broken)


def reload_plugins() -> None:
    """Forget discovered entry points and scan again (in-process registrations are kept)."""
    global _registry
    keep = [v for v in _registry.variants.values() if v.distribution is None]
    _registry = _Registry()
    for info in keep:
        _register(info.plugin, distribution=None, version=None, replace=True)


_config.resolve_config_class = lambda name: get_variant(name).config_class
