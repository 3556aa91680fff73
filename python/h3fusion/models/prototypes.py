"""Prototype router rows (design.md §3, router init "prototypes"): run a few prompts per expert through the base model
and take, per decoder layer, the unit-normalised mean hidden state at the MLP input.

When the base is a checkpoint folder it is never loaded whole: the model is built on the `meta` device and each
decoder layer's weights are read from the checkpoint (fp32) just before the layer runs and dropped right after it, so
the forward pass holds one decoder layer (fp32) at a time next to the embedding (in the checkpoint's dtype, mapped).
Each prompt runs on its own (batch of one, as with a loaded model), so the rows are the same as with the base loaded
whole in fp32; the price is one read of the base's layers per prompt (prompts are few).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .weight_source import WeightSource

__all__ = ["prototype_rows", "streamed_base_model", "tokenize_prompts"]


def tokenize_prompts(prompts: Sequence[Any], tokenizer) -> list[torch.Tensor]:
    """Prompts (strings, token-id lists or 1-D tensors) -> 1-D int64 token-id tensors."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prototype prompts need a tokenizer (pass tokenizer=, or a base directory)")
            out.append(torch.tensor(tokenizer(p)["input_ids"], dtype=torch.long))
        else:
            out.append(torch.as_tensor(p, dtype=torch.long).reshape(-1))
    return out


def _set_params(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    for name, value in values.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))


def _load(src: WeightSource, prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    values = {}
    for name, p in module.named_parameters():
        value = src.get(prefix + name).float()
        if value.shape != p.shape:
            raise ValueError(f"{prefix}{name}: shape {tuple(value.shape)} does not fit the base's {tuple(p.shape)}")
        values[name] = value
    return values


@contextlib.contextmanager
def streamed_base_model(base_src: WeightSource) -> Iterator[torch.nn.Module]:
    """The base's decoder (`LlamaModel` / `MistralModel`, fp32) whose layers load their weights only while they run.

    Yields:
        The decoder module; call it with `input_ids` [1, S] int64. Its weights stay on the meta device except the
        embedding (checkpoint dtype, output widened to fp32), the final norm, and the one decoder layer running.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        causal_lm = AutoModelForCausalLM.from_config(base_src.config, dtype=torch.float32)
    decoder = causal_lm.model
    # non-persistent buffers (RoPE's inverse frequencies) were computed on meta: compute them again for real
    decoder.rotary_emb = type(decoder.rotary_emb)(config=decoder.config)
    _set_params(decoder.norm, _load(base_src, "model.norm.", decoder.norm))
    # the embedding stays in the checkpoint's dtype (memory-mapped, no fp32 copy of a vocab x H matrix): a lookup
    # followed by an exact widening to fp32 gives the rows an fp32 table would
    embedding = base_src.get("model.embed_tokens.weight")
    if embedding.shape != decoder.embed_tokens.weight.shape:
        raise ValueError(f"model.embed_tokens.weight: shape {tuple(embedding.shape)} does not fit the base's config")
    _set_params(decoder.embed_tokens, {"weight": embedding})
    widen = decoder.embed_tokens.register_forward_hook(lambda module, args, output: output.float())

    def materialise(layer_idx):
        def hook(module, args, kwargs):
            _set_params(module, _load(base_src, f"model.layers.{layer_idx}.", module))

        return hook

    def release(module, args, kwargs, output):
        module.to("meta")  # drop this layer's weights before the next layer loads its own

    handles = [widen]
    for i, layer in enumerate(decoder.layers):
        handles.append(layer.register_forward_pre_hook(materialise(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(release, with_kwargs=True))
    try:
        yield decoder.eval()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prototype_rows(base, base_src: WeightSource, names, prompts, tokenizer=None) -> list[torch.Tensor]:
    """Per layer, an [N, H] fp32 matrix whose row i is the unit-normalised mean MLP-input hidden state of expert i's
    prompts, computed with the base model: `base` itself when it is a loaded model, else streamed layer by layer from
    its checkpoint (`streamed_base_model`).

    Args:
        base: the base as given to fusion (a loaded model or a checkpoint directory).
        base_src: the base's weights.
        names: the expert names, in expert order.
        prompts: expert name -> prompts (strings, token-id lists or 1-D tensors).
        tokenizer: tokenizes string prompts; default: the tokenizer saved with `base` when it is a directory.

    Returns:
        One [N, H] float32 tensor per decoder layer.
    """
    if tokenizer is None and isinstance(base, (str, os.PathLike)):
        from transformers import AutoTokenizer

        with contextlib.suppress(Exception):
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(base))
    token_ids = {name: tokenize_prompts(prompts[name], tokenizer) for name in names}  # bad prompts fail before work
    if isinstance(base, torch.nn.Module):
        context = contextlib.nullcontext(base.model)
    else:
        context = streamed_base_model(base_src)
    with context as decoder:
        return _rows(decoder, names, token_ids, base_src.config.hidden_size)


def _rows(decoder, names, token_ids, hidden_size) -> list[torch.Tensor]:
    was_training = decoder.training
    decoder.eval()
    device = decoder.embed_tokens.weight.device
    sums = [torch.zeros(len(names), hidden_size) for _ in decoder.layers]
    counts = [0] * len(names)
    current = {"expert": 0}

    def hook(layer_idx):
        def fn(module, args):
            h = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()
            sums[layer_idx][current["expert"]] += h.sum(0)

        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(decoder.layers)]
    try:
        for e, name in enumerate(names):
            current["expert"] = e
            for ids in token_ids[name]:
                if ids.numel() == 0:
                    continue
                decoder(input_ids=ids.unsqueeze(0).to(device))
                counts[e] += ids.numel()
    finally:
        for h in handles:
            h.remove()
        decoder.train(was_training)
    if min(counts) == 0:
        raise ValueError("prototype_prompts: every expert needs at least one non-empty prompt")
    n = torch.tensor(counts, dtype=torch.float32).unsqueeze(1)
    return [torch.nn.functional.normalize(s / n, dim=-1) for s in sums]
