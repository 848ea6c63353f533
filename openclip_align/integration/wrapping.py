"""Small pieces the factory hooks share: where the plugin's configs live, and a context-setting wrapper.

Kept apart so that :mod:`.factory_patch` and :mod:`.authors_loading` both import it and never each other.
"""
from __future__ import annotations

import functools
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"


def with_context(var, value_of, upstream):
    """``upstream`` with the context variable ``var`` set to ``value_of(its arguments)`` while it runs."""
    @functools.wraps(upstream)
    def wrapper(*args, **kwargs):
        token = var.set(value_of(*args, **kwargs))
        try:
            return upstream(*args, **kwargs)
        finally:
            var.reset(token)

    wrapper.__wrapped_upstream__ = upstream
    return wrapper
