"""Building models whose every weight is written right after (fusion, the shared-base loader): no init pass."""

from __future__ import annotations

import contextlib

__all__ = ["no_init_weights"]


def no_init_weights():
    """transformers' context that skips weight initialisation (the weights are all written afterwards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.x layouts
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
