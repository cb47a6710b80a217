"""Tools on top of the library: the ``lora-lite`` command line (:mod:`.cli`) and the probe (:mod:`.probe`)."""
