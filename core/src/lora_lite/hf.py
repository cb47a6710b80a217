"""Kept import path: ``from lora_lite.hf import AdapterCheckpointCallback`` (the code lives in
:mod:`lora_lite.integrations.hf`)."""

from .integrations.hf import *  # noqa: F401,F403
from .integrations.hf import __all__  # noqa: F401
