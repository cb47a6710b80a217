"""Helpers of the monorepo tests (models, kits, the layer-support matrix); no tests here."""
