"""Batched generation for the evaluation: KV cache, left padding, the tokenizer's chat template when it has one,
greedy by default; or vLLM (`backend="vllm"`) when it is installed.

Prompt text, in order of precedence: a user template (`"... {prompt} ..."`), the tokenizer's chat template
(one user turn, generation prompt added, encoded without extra special tokens since the template writes them),
else the plain prompt (encoded with the tokenizer's special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "GenerationConfig",
    "cut_at_stop",
    "format_prompt",
    "generate_hf",
    "generate_vllm",
    "has_chat_template",
    "load_lm",
    "vllm_available",
]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. temperature 0 = greedy; `seed` seeds each batch (seed + batch index) when sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, template: str | None = None) -> tuple[str, bool]:
    """The text a model is given for `prompt`, and whether to add the tokenizer's special tokens when encoding it.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the user request.
        template: optional text with a `{prompt}` field (wins over the chat template).
    """
    if template is not None:
        return template.replace("{prompt}", prompt), True
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, False
    return prompt, True


def load_lm(path: str, device: str, dtype: str | None = None):
    """A causal LM and its tokenizer from a checkpoint folder; MoE blocks (a fused model) run on our kernels.

    Returns:
        (model in eval mode on `device`, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import replace_moe_blocks

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {path}: cannot load a causal LM: {str(exc).splitlines()[0]}") from None
    replace_moe_blocks(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `stop`, stripped."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    texts: Sequence[str],
    add_special_tokens: Sequence[bool],
    config: GenerationConfig,
    *,
    stop: Sequence[str] = (),
    batch_index: int = 0,
) -> list[str]:
    """Generate one completion per text with `model.generate` (left padding, KV cache).

    Args:
        model: causal LM in eval mode.
        tokenizer: its tokenizer (a missing pad token falls back to EOS).
        texts: prompt texts (already formatted; see `format_prompt`).
        add_special_tokens: per text, whether the tokenizer adds its special tokens.
        config: decoding settings.
        stop: strings that end a completion (it is cut before the first one).
        batch_index: index of this batch in the run (sampling seed = config.seed + batch_index).

    Returns:
        The decoded completions (special tokens skipped, cut at `stop`, stripped).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot batch generation")
    encoded = [list(tokenizer(t, add_special_tokens=bool(a))["input_ids"]) for t, a in zip(texts, add_special_tokens)]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding: every prompt ends at the last column
        ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e) :] = 1
    device = next(model.parameters()).device
    sample = config.temperature > 0
    kwargs = (
        dict(do_sample=sample, temperature=config.temperature, top_p=config.top_p)
        if sample
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    if sample:
        torch.manual_seed(config.seed + batch_index)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        **kwargs,
    )
    new = out[:, width:].cpu()
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in new]


def generate_vllm(path: str, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[str]:
    """Generate with vLLM (`pip install vllm`) from token ids (encoded by our tokenizer, so a chat template's BOS is
    not doubled); one engine for all prompts of a model.

    Returns:
        The raw completions (not cut at stop strings).

    Raises:
        RuntimeError: vllm is not importable.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise RuntimeError(f"--backend vllm needs the vllm package, which is not importable here ({exc})") from None
    llm = LLM(model=path, seed=config.seed)
    params = SamplingParams(
        temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens, seed=config.seed
    )
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params)
    return [o.outputs[0].text for o in outputs]


def vllm_available() -> bool:
    """Whether vllm can be imported."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
