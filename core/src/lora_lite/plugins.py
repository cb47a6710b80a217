"""Plugin manager: entry-point discovery, in-process registration, broken-plugin isolation.

Variants are found in the entry-point group ``lora_lite.variants`` (one entry point per
distribution, pointing at the variant class or module) and through ``@lora_lite.register``
for notebooks. Layer kinds (how a layer stores its weight, see :mod:`lora_lite.weights`)
are found in the group ``lora_lite.layer_kinds`` (objects implementing the
``layer_kinds`` hook of :class:`lora_lite.hookspecs.LayerKindHooks`). A plugin that
fails to import or to validate is recorded with its distribution, version and error and
skipped; everything else keeps working.

Environment variables (read at discovery):

``LORA_LITE_PLUGINS``
    comma-separated entry-point or distribution names to load; unset = all, empty = none.
``LORA_LITE_DISABLE_PLUGINS``
    comma-separated entry-point or distribution names never to load.

A variant left out this way is never imported; asking for it raises
:class:`UnknownVariantError` naming the variable that hid it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .config import LoraLiteConfig
from .errors import LoraLiteError, PluginError, UnknownVariantError
from .weights import LayerKind, register_layer_kind, unregister_layer_kind

ENTRY_POINT_GROUP = "lora_lite.variants"
LAYER_KIND_GROUP = "lora_lite.layer_kinds"
HOOK_NAMES = ("param_specs", "init", "group_init", "forward", "forward_input")
_REQUIRED = ("param_specs",)
_ONE_OF = ("forward", "forward_input")


@dataclass
class VariantInfo:
    """A registered variant: its plugin object, config class and resolved hook functions."""

    name: str
    plugin: Any
    config_class: type[LoraLiteConfig]
    distribution: str | None
    version: str | None
    module: str
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def hook(self, name: str) -> Callable[..., Any] | None:
        return self.hooks.get(name)


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded or validated."""

    name: str
    distribution: str | None
    version: str | None
    error: str
    group: str = ENTRY_POINT_GROUP


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.kinds_pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.kinds_pm.add_hookspecs(hookspecs.LayerKindHooks)
        self.variants: dict[str, VariantInfo] = {}
        self.entry_point_kinds: list[str] = []
        self.broken: list[BrokenPlugin] = []
        # entry-point name -> why it was not loaded (an environment variable)
        self.skipped: dict[str, str] = {}
        self.discovered = False


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


def _register(plugin: Any, *, distribution: str | None, version: str | None, replace: bool) -> VariantInfo:
    name = getattr(plugin, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(
            f"plugin {plugin!r} has no valid `name` attribute (got {name!r}); give the variant class "
            "a string identifier, e.g. name = 'myvariant'."
        )
    config_class = getattr(plugin, "config_class", LoraLiteConfig)
    if not (isinstance(config_class, type) and issubclass(config_class, LoraLiteConfig)):
        raise PluginError(
            f"variant {name!r}: config_class must be a dataclass subclass of lora_lite.LoraLiteConfig, "
            f"got {config_class!r}."
        )
    if name in _registry.variants:
        existing = _registry.variants[name]
        if not replace and existing.distribution is not None:
            raise PluginError(
                f"variant {name!r} is already provided by {existing.distribution} {existing.version}; "
                "pass replace=True to override it in this process."
            )
        _unregister(name)
    pm = _registry.pm
    try:
        pm.register(plugin, name=f"lora_lite.variant.{name}")
    except pluggy.PluginValidationError as err:
        specs = ", ".join(f"{h}({', '.join(getattr(pm.hook, h).spec.argnames)})" for h in HOOK_NAMES)
        raise PluginError(
            f"variant {name!r} has a hook that does not match the contract: {err}. Fix its signature: a "
            f"@lora_lite.hookimpl may take a subset of its spec's arguments and no others; the specs are {specs}."
        ) from err
    try:
        unknown = [hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
        if unknown:
            raise PluginError(
                f"variant {name!r} implements unknown hook(s) {unknown}; the contract's hooks are {HOOK_NAMES}."
            )
        hooks: dict[str, Callable[..., Any]] = {}
        for hook_name in HOOK_NAMES:
            caller = getattr(pm.hook, hook_name)
            spec_args = tuple(caller.spec.argnames)
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    hooks[hook_name] = _bind(impl, spec_args)
        missing = [h for h in _REQUIRED if h not in hooks]
        if missing or not any(h in hooks for h in _ONE_OF):
            undecorated = [h for h in HOOK_NAMES if h not in hooks and callable(getattr(plugin, h, None))]
            hint = f" ({undecorated} exist but are not decorated with @lora_lite.hookimpl)" if undecorated else ""
            raise PluginError(
                f"variant {name!r} must implement {list(_REQUIRED)} and one of {list(_ONE_OF)}; "
                f"it implements {sorted(hooks)}{hint}."
            )
    except PluginError:
        pm.unregister(plugin)
        raise
    module = plugin.__name__ if inspect.ismodule(plugin) else getattr(plugin, "__module__", "?")
    info = VariantInfo(name, plugin, config_class, distribution, version, module, hooks)
    _registry.variants[name] = info
    return info


def _unregister(name: str) -> None:
    info = _registry.variants.pop(name)
    _registry.pm.unregister(info.plugin)


def _register_layer_kinds(plugin: Any, name: str) -> list[str]:
    """Register the kinds ``plugin``'s ``layer_kinds`` hook returns; all or none."""
    pm = _registry.kinds_pm
    try:
        pm.register(plugin, name=f"lora_lite.layer_kinds.{name}")
    except pluggy.PluginValidationError as err:
        raise PluginError(f"layer-kind plugin {name!r} has a hook that does not match the contract: {err}") from err
    added: list[str] = []
    try:
        impls = [i for i in pm.hook.layer_kinds.get_hookimpls() if i.plugin is plugin]
        if not impls:
            raise PluginError(f"layer-kind plugin {name!r} has no @lora_lite.hookimpl layer_kinds() hook.")
        kinds = impls[0].function()
        if not isinstance(kinds, (list, tuple)) or not all(isinstance(k, LayerKind) for k in kinds):
            raise PluginError(f"layer-kind plugin {name!r}: layer_kinds() must return a list of LayerKind, got {kinds!r}.")
        for kind in kinds:
            register_layer_kind(kind)
            added.append(kind.name)
    except LoraLiteError:
        for kind_name in added:
            unregister_layer_kind(kind_name)
        pm.unregister(plugin)
        raise
    return added


def _entry_points(group: str):
    only = _env_names("LORA_LITE_PLUGINS")
    disabled = _env_names("LORA_LITE_DISABLE_PLUGINS") or set()
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        names = {ep.name, dist}
        where = f"{dist} {version}"
        if names & disabled:
            _registry.skipped[ep.name] = (
                f"installed ({where}) but disabled by LORA_LITE_DISABLE_PLUGINS="
                f"{os.environ['LORA_LITE_DISABLE_PLUGINS']!r}; remove {ep.name!r} from that variable to use it"
            )
            continue
        if only is not None and not names & only:
            _registry.skipped[ep.name] = (
                f"installed ({where}) but not selected by LORA_LITE_PLUGINS={os.environ['LORA_LITE_PLUGINS']!r}; "
                f"add {ep.name!r} to that variable, or unset it to load every installed plugin"
            )
            continue
        yield ep, dist, version


def _discover() -> None:
    if _registry.discovered:
        return
    _registry.discovered = True
    for ep, dist, version in _entry_points(LAYER_KIND_GROUP):
        try:
            _registry.entry_point_kinds += _register_layer_kinds(ep.load(), ep.name)
        except Exception as err:  # isolation: one broken plugin must not hide the others
            _registry.broken.append(BrokenPlugin(ep.name, dist, version, f"{type(err).__name__}: {err}", LAYER_KIND_GROUP))
    for ep, dist, version in _entry_points(ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
            _register(plugin, distribution=dist or "?", version=version, replace=False)
        except Exception as err:
            _registry.broken.append(BrokenPlugin(ep.name, dist, version, f"{type(err).__name__}: {err}"))


def register(plugin: Any = None, *, replace: bool = False) -> Any:
    """Register a variant in this process (notebooks, tests). Usable as a decorator.

    Re-registering a name that was registered in-process replaces it silently (re-run
    notebook cells); shadowing an installed distribution's variant needs ``replace=True``.
    """

    def _do(p: Any) -> Any:
        _discover()
        _register(p, distribution=None, version=None, replace=replace)
        return p

    return _do if plugin is None else _do(plugin)


def unregister(name: str) -> None:
    """Remove a variant registered with :func:`register`."""
    if name not in _registry.variants:
        raise UnknownVariantError(f"no variant named {name!r} is registered.")
    _unregister(name)


def get_variant(name: str) -> VariantInfo:
    """The variant called ``name``, or an error that lists what is installed and what to install."""
    _discover()
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
    installed = sorted(_registry.variants) or ["none"]
    raise UnknownVariantError(
        f"unknown variant {name!r}. Installed variants: {', '.join(installed)}. "
        f"If it is published, install it with `pip install lora-lite-{name.replace('_', '-')}`."
    )


def list_variants() -> list[VariantInfo]:
    _discover()
    return [_registry.variants[k] for k in sorted(_registry.variants)]


def broken_plugins() -> list[BrokenPlugin]:
    _discover()
    return list(_registry.broken)


def reload_plugins() -> None:
    """Forget discovered entry points and scan again (in-process registrations are kept)."""
    global _registry
    keep = [v for v in _registry.variants.values() if v.distribution is None]
    for kind_name in _registry.entry_point_kinds:
        try:
            unregister_layer_kind(kind_name)
        except LoraLiteError:  # already unregistered by hand
            pass
    _registry = _Registry()
    _discover()
    for info in keep:
        _register(info.plugin, distribution=None, version=None, replace=True)
