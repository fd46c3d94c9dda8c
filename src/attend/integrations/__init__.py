"""Integrations of attend with model libraries. Each submodule is optional: it imports its
library and raises ``ImportError`` naming what to install when the library is missing.

- :mod:`attend.integrations.transformers`: ``attn_implementation="attend"`` for Hugging Face
  transformers models.
"""
