"""The variant contract: every hook a variant plugin may implement, and what core reads.

A variant is a class (or module) with a ``name`` string and functions named as the hooks
below. Nothing else is needed: no ``@staticmethod`` (a function in a class body is called
on the class), no decorator (``@lora_lite.hookimpl`` is accepted, for plugins written
before it became optional). A hook may take a subset of its spec's arguments, by name, but
no argument the spec does not name, and never ``self``: all of that is refused at
registration with a :class:`lora_lite.PluginError` naming the plugin and what to change.

Declarations core reads (all optional; see :class:`lora_lite.plugins.VariantInfo`)::

    class MyVariant:
        name = "myvariant"            # = the entry-point name (checked)
        config_class = MyConfig       # a @dataclass subclass of LoraLiteConfig,
                                      # variant: str = "myvariant", a default for every knob
        layer_kinds = ("linear", "conv1d")   # None (default): every linear-like kind
        peft = lora_lite.PeftFormat(...)     # how it reads/writes PEFT adapters
        size_knob = "r"               # the int knob a budget-matched comparison scales
                                      # (None: the size is fixed by the layer shapes)
        lrs = (1e-4, 3e-4, 1e-3)      # learning rates a comparison sweeps
        additive = True               # forward is y + delta(x) only (or a function of cfg):
                                      # adapter_batch may mix such attachments per row
        merged_forward = True         # delta is a dense dW: on nn.Linear / Conv1D core runs
                                      # F.linear(x, *merge(layer, W, b)), one matmul; needs a
                                      # differentiable merge (and forward, for other layers)

pluggy does discovery, registration and signature validation. It does NOT dispatch on
the forward path: at ``attach`` the runtime looks up the configured variant's own
implementations once and calls them directly, so each hook below is called for exactly
one plugin, the configured one, never fanned out across all installed variants.

Required: ``param_specs`` and at least one of ``forward`` / ``forward_input``.
"""

from __future__ import annotations

import inspect

import pluggy

PROJECT_NAME = "lora_lite"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def param_specs(d_in, d_out, cfg, target):
    """Declare the adapter tensors one target layer gets.

    Called at ``attach`` for every target, before the model is touched, so anything it
    raises (e.g. a :class:`lora_lite.ConfigError` for a rank too large for the layer)
    aborts the attach with nothing changed.

    :param int d_in: the layer's input features.
    :param int d_out: the layer's output features.
    :param cfg: the variant's config (an instance of its ``config_class``).
    :param target: the :class:`lora_lite.Target` (``.layer``, ``.name``, ...), for a variant
        whose tensors depend on the layer's kind (a convolution's kernel:
        ``lora_lite.kind_name(target.layer)``). Most variants need only the first three.
    :returns: ``{name: ParamSpec}``. Every name must start with ``lora_``; the runtime
        creates each tensor on the layer's device as ``layer.<name>`` (an
        ``nn.Parameter``, trainable or not as the spec says) and fills it by
        ``spec.init``. ``state_dict()`` then holds them under full-path keys.
    """


@hookspec
def init(layer, cfg, targets):
    """Initialise one target's adapter tensors from its weight (no data).

    Called at ``attach`` (and so again at ``load``, before the saved tensors are
    copied in) after the ``param_specs`` tensors exist on ``layer``. Read the weight with
    :func:`lora_lite.dense_weight`, never ``layer.weight.data``: quantized layers then
    give real numbers or a clear error. A variant that changes the base weight must do
    so through :func:`lora_lite.replace_dense_weight`, which records the original so
    that ``detach`` restores it exactly; on a quantized layer
    (:func:`lora_lite.is_quantized`) that write requantizes, so it needs an explicit
    ``requantize=True`` and the variant should make it an opt-in knob. Derived constants (scalings) may be stored as
    plain attributes named ``lora_*``; the runtime removes them on detach.

    Optional. If it raises, the whole attach is rolled back.

    :param layer: the target ``nn.Module``; ``layer.lora_cfg`` is ``cfg``.
    :param cfg: the variant's config.
    :param targets: ``list[Target]``, every target of this attach in the order ``init``
        visits them (so ``targets[0]`` is initialised first). For tensors shared by all
        targets and sized by all of them (VeRA's projections): create them when ``layer``
        is ``targets[0].layer`` and reuse them afterwards. Unlike ``group_init`` this
        also runs at ``load``, so shared tensors regenerated here need not be saved.
    :returns: ignored.
    """


@hookspec
def group_init(model, targets, cfg, calibration_data):
    """Data-calibrated initialisation over all targets at once.

    Called once at ``attach`` after every ``init``, with whatever the user passed as
    ``calibration_data`` (possibly ``None``: raise :class:`lora_lite.CalibrationError`
    if the variant cannot work without data). Never called at ``load``: everything
    calibration chose must live in persistent ``lora_*`` tensors so that a checkpoint
    reloads without data. Run the model on the data with temporary hooks on each
    ``target.host`` (the module the model calls, also when the attachment is stacked on a
    layer that has another), remove them, then write the tensors. ``init`` has already run for every target, so a variant
    that both calibrates and rewrites base weights rewrites them here, after
    calibrating, never in ``init``. Core has already refused empty data and NaN/inf in
    floating tensors (:class:`lora_lite.CalibrationError`); raise it yourself for
    anything else your variant cannot calibrate on.

    A variant may run ``backward`` here (LoRA-GA's gradients of the calibration loss):
    core restores every parameter's ``requires_grad`` and ``.grad`` afterwards, whatever
    the hook changed.

    Optional. If it raises, the whole attach is rolled back.

    :param model: the whole model (adapter hooks are not yet registered).
    :param targets: ``list[Target]`` with ``.name``, ``.layer``, ``.roles``, ``.d_in``,
        ``.d_out``.
    :param cfg: the variant's config.
    :param calibration_data: an iterable of whole-model inputs (a dict of tensors for
        HF models, or a tensor): what the user passed if it is a tensor, dict, list or
        tuple (checked whole before this hook runs); a stream (generator, DataLoader)
        comes wrapped so that each batch is checked as you read it (``len`` still works
        when the stream has one). Iterate it once.
    :returns: ignored.
    """


@hookspec
def forward(layer, x, y):
    """Post-hook: compute the layer's new output from its input and base output.

    Called on every forward of every target, directly (no plugin dispatch). This is the
    hot path: plain matmuls, no Python loops over ranks, and cast the small adapter
    tensors to ``x.dtype`` rather than casting the activations. The low-rank
    ``y + s * B A x`` is ``lora_lite.low_rank_update(x, A, B, s, y)`` (scale and add fused).

    :param layer: the target module (its ``lora_*`` tensors are attributes).
    :param x: the layer's first positional input, shape ``(..., d_in)``.
    :param y: the base layer's output, shape ``(..., d_out)``.
    :returns: the new output, same shape and dtype as ``y`` (additive variants return
        ``y + delta``).
    """


@hookspec
def forward_input(layer, x):
    """Pre-hook: transform the layer's input before the base layer sees it.

    For variants that act on the input side (HRA, OFT, IA3 on feed-forward). Same hot
    path rules as ``forward``. A variant may implement both hooks.

    :param layer: the target module.
    :param x: the layer's first positional input, shape ``(..., d_in)``.
    :returns: the new input, same shape and dtype as ``x``.
    """


@hookspec
def merge(layer, weight, bias):
    """Fold the adapter into a dense weight and bias: what ``lora_lite.merge`` writes.

    Called outside the forward path (merge, merged export), once per target, under
    ``torch.no_grad``. Must give exactly the function the hooks compute: for every input,
    ``x @ W'.T + b'`` equals the hooked layer's output up to float rounding. Additive
    variants return ``W + delta``; input-side ones ``W @ R``; output-side scalings scale
    the bias too. Core computes nothing variant-specific.

    Optional: a variant without it cannot be merged (a typed error says so).

    :param layer: the target module (its ``lora_*`` tensors and ``layer.lora_cfg``).
    :param weight: the layer's current dense weight ``(d_out, d_in)`` in float32 (for a
        variant that rewrote the base, e.g. PiSSA's ``W_res``, that rewritten weight).
    :param bias: the layer's bias ``(d_out,)`` in float32, or ``None``.
    :returns: ``(weight, bias)``: new tensors of the same shapes (``bias`` may stay ``None``
        only if it was ``None``).
    """


@hookspec
def step(model, targets, cfg):
    """Advance the variant's training-time schedule by one optimizer step.

    Called by ``lora_lite.step(model)``, once per attachment, which users call after
    ``optimizer.step()`` and before ``optimizer.zero_grad()`` (so gradients are still
    there: importance scores read them); the transformers callback
    ``lora_lite.hf.AdapterCheckpointCallback`` calls it at that point for Trainer users.
    For rank schedules (AdaLoRA's budget allocation) and anything else that changes
    between steps. Not on the forward path. Keep every piece of state that a resumed run
    needs (a step counter, masks) in persistent ``lora_*`` tensors, so ``save``/``load``
    carry it exactly.

    Optional.

    :param model: the whole model.
    :param targets: ``list[Target]`` of this attachment.
    :param cfg: the variant's config.
    :returns: ignored.
    """


@hookspec
def regularization_loss(model, targets, cfg):
    """A term to add to the training loss (AdaLoRA's orthogonality penalty).

    Called by ``lora_lite.regularization_loss(model)``, which sums the terms of every
    attachment; users add that to their loss before ``backward``. Must be differentiable
    with respect to the adapter tensors, and already weighted by the variant's own knob.

    Optional.

    :returns: a scalar tensor, or ``None`` for no term.
    """


@hookspec
def hotswap(layer, cfg, saved_cfg, saved):
    """Map a saved adapter of another config of this variant onto this layer's tensors.

    Called by ``lora_lite.load(model, path, name=...)`` when ``name`` is an existing
    attachment of this variant whose config differs from the file's (a different rank,
    alpha, ...): a hot-swap in place, so a ``torch.compile``d model does not recompile.
    Without this hook such a load is refused (:class:`lora_lite.CheckpointMismatchError`).

    :param layer: the target (or its adapter slot), with its tensors for config ``cfg``.
    :param saved_cfg: the config the file was saved with.
    :param saved: ``{tensor name: tensor}`` the file holds for this target.
    :returns: ``{tensor name: tensor}`` for every persistent adapter tensor of the layer,
        each shaped like the layer's (they are copied in place; nothing is re-created).
        Raise :class:`lora_lite.ConfigError` when ``saved_cfg`` does not fit (e.g. a rank
        above the one the attachment was padded to); the load is then refused and
        nothing is copied.
    """


HOOK_NAMES = ("param_specs", "init", "group_init", "forward", "forward_input", "merge", "step", "regularization_loss",
              "hotswap")


def spec_args(hook: str) -> tuple[str, ...]:
    """The argument names of a hook spec, in order (``spec_args("forward") == ("layer", "x", "y")``)."""
    return tuple(inspect.signature(globals()[hook]).parameters)
