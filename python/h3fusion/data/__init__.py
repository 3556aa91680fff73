"""h3fusion.data."""

from .instructions import (  # noqa: F401
    ALPACA_PROMPT,
    InstructionCollator,
    InstructionDataset,
    InstructionExample,
    category_index,
    expert_names_from_config,
    format_prompt,
    load_alpaca,
    load_beavertails,
    load_instructions,
    load_paper_datasets,
    load_truthfulqa,
    save_instructions,
    tokenize_instruction,
)
from .preference import (  # noqa: F401
    PreferenceRecord,
    Response,
    build_pairs,
    load_records,
    normalize_weights,
    rloo_groups,
    save_records,
    sft_examples,
)
from .tokens import IGNORE_INDEX, ensure_pad_token, pad_token_id, response_token_ids  # noqa: F401
