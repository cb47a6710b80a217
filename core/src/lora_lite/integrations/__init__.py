"""Integrations with other libraries: transformers (:mod:`.hf`) and PEFT's adapter format (:mod:`.peft`).

Neither is imported by ``import lora_lite``; each imports its library only when used.
"""
