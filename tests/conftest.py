"""Cross-package tests: every installed variant, real transformers architectures."""
