import re

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import runtime
from lora_lite.testing import ToyTransformer, assert_model_unchanged, snapshot_model


def test_only_adapter_params_train(model):
    att = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(att.adapter_tensors())
    assert len(trainable) == 2 * len(att)


def test_failure_midway_rolls_back(model, x):
    class Fails:
        name = "t_fails"
        calls = 0

        @staticmethod
        @ll.hookimpl
        def param_specs(d_in, d_out, cfg):
            return {"lora_A": ll.ParamSpec((1, d_in))}

        @staticmethod
        @ll.hookimpl
        def init(layer, cfg):
            Fails.calls += 1
            ll.replace_dense_weight(layer, torch.zeros_like(ll.dense_weight(layer)))
            if Fails.calls == 5:
                raise RuntimeError("boom in the 5th init")

        @staticmethod
        @ll.hookimpl
        def forward(layer, x, y):
            return y

    ll.register(Fails)
    try:
        snap = snapshot_model(model, x)
        with pytest.raises(ll.AttachError, match="init of .*boom in the 5th init.*rolled back"):
            ll.attach(model, ll.LoraLiteConfig(variant="t_fails"))
        assert Fails.calls == 5
        assert_model_unchanged(model, snap, x)
        assert ll.attachments(model) == []
    finally:
        ll.unregister("t_fails")


def test_attach_twice_raises_and_changes_nothing(model):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    snap = snapshot_model(model)
    with pytest.raises(ll.AlreadyAttachedError, match="detach"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    assert_model_unchanged(model, snap)


def test_disjoint_attachments_coexist_and_detach_independently(model, x):
    base = model(x)
    a = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2, target_names=(r"q_proj$",)))
    b = ll.attach(model, ll.LoraLiteConfig(variant="t_scale", target_names=(r"down_proj$",), start=1.0))
    assert len(ll.attachments(model)) == 2
    with torch.no_grad():
        model.layers[0].down_proj.lora_g.fill_(2.0)
    assert not torch.allclose(model(x), base)
    b.detach()
    torch.testing.assert_close(model(x), base)
    assert model.layers[0].q_proj.lora_A.requires_grad
    a.detach()
    assert ll.attachments(model) == []
    assert all(p.requires_grad for p in model.parameters())


def test_detach_without_attach(model):
    with pytest.raises(ll.NotAttachedError, match="attach"):
        ll.detach(model)


def test_save_without_attach(model, tmp_path):
    with pytest.raises(ll.NotAttachedError):
        ll.save(model, tmp_path / "a.safetensors")


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ll.AttachError, match="meta"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=1))


def test_layer_called_without_positional_input(model):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=1, target_names=(r"layers\.0\.q_proj$",)))
    with pytest.raises(ll.ForwardError, match="positional"):
        model.layers[0].q_proj(input=torch.randn(1, 32))


def test_calibration_data_for_a_weight_only_variant(model):
    snap = snapshot_model(model)
    with pytest.raises(ll.ConfigError, match="calibration"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_lora"), calibration_data=[torch.randn(1, 32)])
    assert_model_unchanged(model, snap)


def test_bf16_adapter_keeps_activation_dtype(model, x):
    ll.attach(model, ll.LoraLiteConfig(variant="t_lora", dtype=torch.bfloat16))
    assert model.layers[0].q_proj.lora_A.dtype == torch.bfloat16
    assert model(x).dtype == torch.float32


def test_keep_fp32_overrides_storage_dtype(model):
    ll.attach(model, ll.LoraLiteConfig(variant="t_scale", dtype=torch.bfloat16))
    assert model.layers[0].q_proj.lora_g.dtype == torch.float32


def test_weight_access_refuses_unknown_storage():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 4
            self.weight = nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)

    with pytest.raises(ll.WeightAccessError, match="no registered layer kind"):
        ll.dense_weight(Packed())
    assert ll.is_quantized(Packed())


def test_attach_rejects_non_config(model):
    with pytest.raises(ll.ConfigError):
        runtime.attach(model, {"variant": "t_lora"})


class _Mutating:
    """init rewrites each weight and stores an attribute; group_init calibrates, then fails if told to."""

    name = "t_mutating"
    fail_in_group_init: BaseException | None = None

    @staticmethod
    @ll.hookimpl
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ll.ParamSpec((1, d_in)), "lora_m": ll.ParamSpec((d_in,), trainable=False)}

    @staticmethod
    @ll.hookimpl
    def init(layer, cfg):
        ll.replace_dense_weight(layer, ll.dense_weight(layer) * 0.5)
        layer.lora_half = True

    @staticmethod
    @ll.hookimpl
    def group_init(model, targets, cfg, calibration_data):
        with torch.no_grad():
            outputs = [model(batch) for batch in calibration_data]
            for t in targets:
                t.layer.lora_m.fill_(float(len(outputs)))
        if _Mutating.fail_in_group_init is not None:
            raise _Mutating.fail_in_group_init

    @staticmethod
    @ll.hookimpl
    def forward(layer, x, y):
        return y


@pytest.fixture
def mutating():
    ll.register(_Mutating)
    yield _Mutating
    _Mutating.fail_in_group_init = None
    ll.unregister("t_mutating")


@pytest.mark.parametrize("fault", [RuntimeError("group_init blew up"), KeyboardInterrupt()])
def test_group_init_failure_rolls_back_weights_tensors_and_flags(model, x, mutating, fault):
    mutating.fail_in_group_init = fault
    model.layers[0].norm.weight.requires_grad_(False)  # a user-frozen flag must survive
    snap = snapshot_model(model, x)
    # an Exception is wrapped in an AttachError naming the stage; a KeyboardInterrupt stays itself
    expected = ll.AttachError if isinstance(fault, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        ll.attach(model, ll.LoraLiteConfig(variant="t_mutating"), calibration_data=[x, x])
    if expected is ll.AttachError:
        assert re.search(r"failed during group_init: RuntimeError: group_init blew up.*rolled back", str(info.value))
    assert_model_unchanged(model, snap, x)


def test_hook_registration_failure_removes_the_hooks_already_registered(model, x, monkeypatch):
    calls = []
    real = nn.Module.register_forward_hook

    def flaky(self, hook, **kw):
        calls.append(self)
        if len(calls) == 5:
            raise RuntimeError("out of hook ids")
        return real(self, hook, **kw)

    snap = snapshot_model(model, x)
    monkeypatch.setattr(nn.Module, "register_forward_hook", flaky)
    with pytest.raises(ll.AttachError, match=r"during registering hooks: RuntimeError: out of hook ids.*rolled back"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2))
    monkeypatch.undo()
    assert len(calls) == 5  # four hooks were live when the fifth failed
    assert_model_unchanged(model, snap, x)


def test_failed_second_attach_leaves_the_first_intact(model, x, mutating):
    first = ll.attach(model, ll.LoraLiteConfig(variant="t_lora", r=2, target_names=(r"q_proj$",)))
    with torch.no_grad():
        for p in first.trainable_parameters():
            p.normal_()
    snap = snapshot_model(model, x)
    mutating.fail_in_group_init = RuntimeError("second attach fails")
    with pytest.raises(ll.AttachError, match="second attach fails"):
        ll.attach(model, ll.LoraLiteConfig(variant="t_mutating", target_names=(r"up_proj$",)), calibration_data=[x])
    assert_model_unchanged(model, snap, x)
    assert ll.attachments(model) == [first]
    first.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_fingerprint_of_a_rewritten_weight_is_the_original_one(mutating, x, tmp_path):
    torch.manual_seed(0)
    model = ToyTransformer()
    want = {n: ll.weights.base_fingerprint(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    att = ll.attach(model, ll.LoraLiteConfig(variant="t_mutating", r=1), calibration_data=[x])
    halved = att.targets[0].layer
    assert ll.weights.base_fingerprint(halved) == want[att.targets[0].name]
    assert att.fingerprint == {n: want[n] for n in att.target_names}
    torch.manual_seed(0)
    ll.load(ToyTransformer(), ll.save(model, tmp_path / "a.safetensors"))  # the fresh base is the original
    ll.detach(model)
    assert ll.weights.base_fingerprint(halved) == want[att.targets[0].name]


def test_step_and_regularization_loss_reach_the_variant_hooks():
    import lora_lite as ll

    calls = []

    class Scheduled:
        name = "t_scheduled"

        def param_specs(d_in, d_out, cfg):
            return {"lora_g": ll.ParamSpec((d_out,), init=0.0), "lora_steps": ll.ParamSpec((), init=0.0, trainable=False)}

        def forward(layer, x, y):
            return y + layer.lora_g

        def step(model, targets, cfg):
            calls.append(len(targets))
            for t in targets:
                t.layer.lora_steps.add_(1)

        def regularization_loss(model, targets, cfg):
            return sum((t.layer.lora_g ** 2).sum() for t in targets)

    ll.register(Scheduled)
    try:
        model = ToyTransformer()
        ll.attach(model, ll.LoraLiteConfig(variant="t_scheduled", target_names=(r"q_proj$",)))
        ll.attach(model, ll.LoraLiteConfig(variant="lora", r=2, target_names=(r"v_proj$",)))  # no hooks: skipped
        with torch.no_grad():
            model.layers[0].q_proj.lora_g.fill_(2.0)
        reg = ll.regularization_loss(model)
        assert reg.requires_grad and reg.item() == 4.0 * 32  # one layer of 32 outputs at 2.0
        reg.backward()
        torch.testing.assert_close(model.layers[0].q_proj.lora_g.grad, torch.full((32,), 4.0))
        ll.step(model)
        ll.step(model)
        assert calls == [2, 2] and model.layers[1].q_proj.lora_steps.item() == 2.0
    finally:
        ll.detach(model)
        ll.unregister("t_scheduled")
    plain = ToyTransformer()
    ll.attach(plain, ll.LoraLiteConfig(variant="lora", r=2))
    assert ll.regularization_loss(plain).item() == 0.0
    ll.step(plain)  # no schedule: a no-op


def test_group_init_may_run_backward_and_core_restores_grads():
    import lora_lite as ll

    class GradCalibrated:
        name = "t_gradcal"

        def param_specs(d_in, d_out, cfg):
            return {"lora_g": ll.ParamSpec((d_out, d_in), init=0.0)}

        def group_init(model, targets, cfg, calibration_data):
            for t in targets:
                t.layer.weight.requires_grad_(True)
            loss = sum(model(x).pow(2).mean() for x in calibration_data)
            loss.backward()
            with torch.no_grad():
                for t in targets:
                    t.layer.lora_g.copy_(t.layer.weight.grad)

        def forward(layer, x, y):
            return y + x @ layer.lora_g.T * 0.0

    ll.register(GradCalibrated)
    try:
        model = ToyTransformer()
        for p in model.parameters():
            p.requires_grad_(False)
        model.lm_head.weight.requires_grad_(True)
        model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
        ll.attach(model, ll.LoraLiteConfig(variant="t_gradcal", target_names=(r"q_proj$",)),
                  calibration_data=[torch.randn(2, 3, 32)])
        q = model.layers[0].q_proj
        assert q.lora_g.abs().sum() > 0  # the gradient reached the variant
        assert q.weight.grad is None and not q.weight.requires_grad  # and core put things back
        assert torch.equal(model.lm_head.weight.grad, torch.ones_like(model.lm_head.weight))
        ll.detach(model)
        assert model.lm_head.weight.requires_grad and not q.weight.requires_grad
    finally:
        ll.unregister("t_gradcal")
