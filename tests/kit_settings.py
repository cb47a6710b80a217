"""Per-variant settings for the conformance kit when it runs over every installed variant.

A variant missing here runs with the kit's defaults. Keep entries to what the variant's
own plugin tests use, with the reason.
"""


def _model_batch_as_calibration(kit, model):
    """Data-calibrated variants calibrate on the kit's own batch (toy tensors or token dicts)."""
    return [kit.make_batch(model)]


KIT_SETTINGS: dict[str, dict] = {
    # lambda bounds the update norm relative to the weight norms; 15 overshoots on toy widths
    "delora": {"config_kwargs": {"lambda0": 1.0}},
    # the kit passes r=4; OFT takes r (blocks) or oft_block_size, exactly one non-zero (PEFT's rule)
    "oft": {"config_kwargs": {"r": 0, "oft_block_size": 8}},
    # EVA's group_init needs data; the kit passes whatever calibration_data(model) returns
    "eva": {"calibration_data": _model_batch_as_calibration},
    # RoAd needs d_out divisible by group_size; the test models' widths are 16/32/64 (PEFT's default 64)
    "road": {"config_kwargs": {"group_size": 8}},
}


def calibration_for(variant: str, batch):
    """``[batch]`` for a data-calibrated variant (one with a ``group_init`` hook), else ``None``."""
    import lora_lite as ll

    return [batch] if ll.get_variant(variant).hook("group_init") is not None else None
