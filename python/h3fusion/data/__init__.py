"""h3fusion.data."""

from .preference import (  # noqa: F401
    PreferenceRecord,
    Response,
    build_pairs,
    load_records,
    model_fingerprint,
    precompute_reference_logps,
    rloo_groups,
    save_records,
    sft_examples,
)
