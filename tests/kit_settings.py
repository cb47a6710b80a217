"""Per-variant settings for the conformance kit when it runs over every installed variant.

A variant missing here runs with the kit's defaults. Keep entries to what the variant's
own plugin tests use, with the reason.
"""

KIT_SETTINGS: dict[str, dict] = {
    # lambda bounds the update norm relative to the weight norms; 15 overshoots on toy widths
    "delora": {"config_kwargs": {"lambda0": 1.0}},
    # the kit passes r=4; OFT takes r (blocks) or oft_block_size, exactly one non-zero (PEFT's rule)
    "oft": {"config_kwargs": {"r": 0, "oft_block_size": 8}},
}
