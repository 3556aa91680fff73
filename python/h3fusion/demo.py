"""`h3fusion demo`: H3Fusion end to end on the CPU in a few minutes, with no downloads.

Stages (each with a progress bar):
 1. generate the corpora (`h3fusion.data.synthetic`) and a word-level tokenizer over their vocabulary;
 2. pretrain a tiny Llama-style base model on plain text;
 3. make three aligned models by fine-tuning the base's MLPs on each category (helpful / harmless / honest); the
    attention stays the base's, as the fused model will use it;
 4. fuse them into a Mixtral MoE with `h3fusion.fuse_models` (one expert per aligned model, top-2 routing,
    prototype router init) and build the model-soup baseline (uniform weight average of the aligned models);
 5. train the fused model with `H3FusionTrainer` (LM loss + gating loss + drift regularizer);
 6. report held-out per-category loss of base / aligned / soup / fused, routing accuracy and usage heatmaps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data.instructions import IGNORE_INDEX, InstructionCollator, InstructionDataset, InstructionExample
from .data.synthetic import build_corpora

__all__ = ["DEMO_TEMPLATE", "CATEGORIES", "build_word_tokenizer", "evaluate_categories", "run_demo"]

CATEGORIES = ("helpful", "harmless", "honest")
DEMO_TEMPLATE = "question : {instruction} answer :"


def build_word_tokenizer(texts: Sequence[str]):
    """A word-level `PreTrainedTokenizerFast` over the whitespace-separated words of `texts` (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for text in texts:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _base_config(vocab_size: int, quick: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48 if quick else 64,
        intermediate_size=96 if quick else 160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def _batches(features: Sequence[Mapping[str, Any]], batch_size: int, gen: torch.Generator, shuffle: bool = True):
    order = torch.randperm(len(features), generator=gen).tolist() if shuffle else list(range(len(features)))
    collate = InstructionCollator(0)
    for i in range(0, len(order), batch_size):
        yield collate([features[j] for j in order[i : i + batch_size]])


def _lm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def train_causal_lm(
    model,
    features,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    desc: str,
    trainable=None,
    progress: bool = True,
) -> list[float]:
    """A plain AdamW loop (cosine decay) on features with input_ids / labels; returns the per-step losses."""
    from tqdm.auto import tqdm

    params = list(trainable if trainable is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(features) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=True)
    for _ in range(epochs):
        for batch in _batches(features, batch_size, gen):
            loss = _lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def evaluate_categories(model, datasets: Mapping[str, Sequence[Mapping[str, Any]]], batch_size: int = 64):
    """Held-out response-token mean NLL per category (prompt and padding masked)."""
    model.eval()
    out = {}
    for cat, feats in datasets.items():
        total, count = 0.0, 0
        for batch in _batches(feats, batch_size, torch.Generator(), shuffle=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += nll.item()
            count += int((labels != IGNORE_INDEX).sum())
        out[cat] = total / max(count, 1)
    return out


def uniform_soup(models: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """The model-soup baseline: the element-wise mean of every weight of same-architecture models."""
    import copy

    soup = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    soup.load_state_dict({k: v.to(states[0][k].dtype) for k, v in merged.items()})
    return soup.eval()


def _format_table(rows: Mapping[str, Mapping[str, float]], cats: Sequence[str]) -> str:
    head = f"| {'model':<18} | " + " | ".join(f"{c:>9}" for c in cats) + f" | {'mean':>7} |"
    sep = "|" + "-" * 20 + "|" + "|".join("-" * 11 for _ in cats) + "|" + "-" * 9 + "|"
    lines = [head, sep]
    for name, vals in rows.items():
        mean = sum(vals[c] for c in cats) / len(cats)
        lines.append(f"| {name:<18} | " + " | ".join(f"{vals[c]:>9.4f}" for c in cats) + f" | {mean:>7.4f} |")
    return "\n".join(lines)


def run_demo(
    out_dir: str = "h3fusion-demo",
    seed: int = 0,
    *,
    quick: bool = False,
    progress: bool = True,
    threads: int | None = 1,
    echo=print,
    experts_implementation: str = "h3fusion",
) -> dict[str, Any]:
    """Runs the whole demo and writes its report to `out_dir`.

    Args:
        out_dir: report folder (created): report.md, results.json, route_report.json / .png.
        seed: seeds data generation, model init and training.
        quick: a much smaller run (tests).
        progress: progress bars.
        threads: torch intra-op threads (default 1: these models are so small that more threads only add
            synchronisation, and on a busy machine OpenMP spin-waiting makes 2 threads up to 50x slower); None
            keeps torch's setting.
        echo: where the table goes (print by default).
        experts_implementation: what runs the fused model's MoE blocks: "h3fusion" (our `topk_route` + `moe_ffn`),
            "grouped_mm" or "eager" (transformers' own); recorded in results.json.

    Returns:
        the results dict written to results.json.
    """

    t0 = time.time()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(out_dir, seed, quick, progress, echo, t0, experts_implementation)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out_dir, seed, quick, progress, echo, t0, experts_implementation):
    from transformers import LlamaForCausalLM, TrainingArguments

    from .models.fuse import fuse_models
    from .models.hf_experts import set_experts_implementation
    from .route_report import route_report
    from .trainers.h3fusion_trainer import H3FusionTrainer
    from .utils.files import atomic_write_json, atomic_write_text

    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    sizes = dict(n_pretrain=300, n_train=60, n_test=16) if quick else dict(n_pretrain=2000, n_train=300, n_test=60)
    epochs = dict(pretrain=2, align=2, fuse=1) if quick else dict(pretrain=6, align=8, fuse=4)
    data = build_corpora(seed=seed, **sizes)
    texts = list(data["pretrain"]) + [DEMO_TEMPLATE]
    for split in ("train", "test"):
        for exs in data[split].values():
            texts += [f"{e.instruction} {e.output}" for e in exs]
    tok = build_word_tokenizer(texts)
    names = list(CATEGORIES)

    def feats(exs: Sequence[InstructionExample]):
        return InstructionDataset(exs, tok, names, max_length=64, template=DEMO_TEMPLATE).features

    train_feats = {c: feats(data["train"][c]) for c in names}
    test_feats = {c: feats(data["test"][c]) for c in names}
    pre_feats = []
    for doc in data["pretrain"]:
        ids = tok(doc, add_special_tokens=False)["input_ids"][:63] + [tok.eos_token_id]
        pre_feats.append({"input_ids": ids, "labels": list(ids)})

    # 2. base model
    base = LlamaForCausalLM(_base_config(len(tok), quick))
    train_causal_lm(
        base,
        pre_feats,
        epochs=epochs["pretrain"],
        lr=3e-3,
        batch_size=32,
        seed=seed,
        desc="1/4 pretrain base",
        progress=progress,
    )

    # 3. aligned models: fine-tune the base's MLPs on one category each
    import copy

    aligned = {}
    for i, cat in enumerate(names):
        m = copy.deepcopy(base)
        mlp = [p for n, p in m.named_parameters() if ".mlp." in n]
        for p in m.parameters():
            p.requires_grad_(False)
        for p in mlp:
            p.requires_grad_(True)
        train_causal_lm(
            m,
            train_feats[cat],
            epochs=epochs["align"],
            lr=3e-3,
            batch_size=16,
            seed=seed + 1 + i,
            desc=f"2/4 align {cat}",
            trainable=mlp,
            progress=progress,
        )
        aligned[cat] = m

    # 4. fuse + soup
    protos = {c: [DEMO_TEMPLATE.format(instruction=e.instruction) for e in data["train"][c][:8]] for c in names}
    fused = fuse_models(
        base,
        aligned,
        top_k=2,
        attention="base",
        router_init="prototypes",
        prototype_prompts=protos,
        tokenizer=tok,
        progress=progress,
    )
    experts_implementation = set_experts_implementation(fused, experts_implementation)
    soup = uniform_soup(list(aligned.values()))
    before = evaluate_categories(fused, test_feats)
    test_examples = [e for c in names for e in data["test"][c]]
    routing_before = route_report(
        fused,
        test_examples,
        tok,
        out_dir,
        expert_names=names,
        max_length=64,
        template=DEMO_TEMPLATE,
        prefix="route_report_untrained",
    )

    # 5. H3Fusion training on the mixed categories
    mixed = [f for c in names for f in train_feats[c]]
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "h3fusion-train"),
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        num_train_epochs=epochs["fuse"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=not progress,
        seed=seed,
        max_grad_norm=1.0,
    )
    trainer = H3FusionTrainer(
        fused,
        args,
        train_dataset=mixed,
        data_collator=InstructionCollator(0),
        lambda_gate=0.1,
        gammas=[1e-2, 1e-2, 1e-2],
        top_k=2,
        experts_implementation=experts_implementation,
    )
    if progress:
        echo("3/4 H3Fusion training (router + experts; attention, norms, embeddings frozen)")
    trainer.train()
    fused.eval()

    # 6. evaluation and report
    if progress:
        echo("4/4 evaluating")
    rows = {"base": evaluate_categories(base, test_feats)}
    for cat in names:
        rows[f"aligned-{cat}"] = evaluate_categories(aligned[cat], test_feats)
    rows["soup (uniform avg)"] = evaluate_categories(soup, test_feats)
    rows["fused (untrained)"] = before
    rows["fused (H3Fusion)"] = evaluate_categories(fused, test_feats)
    routing = route_report(
        fused, test_examples, tok, out_dir, expert_names=names, max_length=64, template=DEMO_TEMPLATE
    )
    best_aligned = {c: min(rows[f"aligned-{k}"][c] for k in names) for c in names}
    margin = {c: rows["fused (H3Fusion)"][c] - best_aligned[c] for c in names}
    table = _format_table(rows, names)
    from .evaluation.demo_eval import run_demo_evaluation  # helpful / harmless / honest with tiny judges

    eval_models = {"base": base, **{f"aligned-{c}": aligned[c] for c in names}, "soup (uniform avg)": soup}
    evaluation, eval_table, eval_cmd = run_demo_evaluation(
        {**eval_models, "fused (H3Fusion)": fused},
        tok,
        data,
        out_dir,
        template=DEMO_TEMPLATE,
        seed=seed,
        quick=quick,
        fused="fused (H3Fusion)",
        experts=[f"aligned-{c}" for c in names],
        progress=progress,
    )
    acc = " | ".join(f"{c} {routing['accuracy'].get(c, float('nan')):.1%}" for c in names)
    elapsed = time.time() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = [
        "# H3Fusion demo",
        "",
        f"seed {seed}{', quick' if quick else ''}; {elapsed:.0f} s on {torch.get_num_threads()} threads; "
        f"MoE blocks on {trainer.experts_implementation}.",
        "",
        "Held-out per-category loss (response-token NLL, lower is better):",
        "",
        table,
        "",
        f"Routing accuracy of the fused model (argmax of mean router probability): {acc} "
        f"(overall {routing['overall_accuracy']:.1%}); before H3Fusion training (prototype router init): "
        + " | ".join(f"{c} {routing_before['accuracy'].get(c, float('nan')):.1%}" for c in names)
        + f" (overall {routing_before['overall_accuracy']:.1%}).",
        "",
        "Fused (H3Fusion) minus best aligned model per category (negative = fused better): "
        + ", ".join(f"{c} {margin[c]:+.4f}" for c in names),
        "",
        "H3Fusion training: gate loss "
        + (f"{logs[0]['gate_loss']:.3f} -> {logs[-1]['gate_loss']:.3f}, " if logs else "")
        + (f"drift {logs[-1]['drift_loss']:.4f}." if logs else ""),
        "",
        "Heatmaps of per-layer expert usage by category: route_report.png (data in route_report.json); before "
        "training: route_report_untrained.png.",
        "",
        eval_table.replace("# H3Fusion evaluation", "## Helpful / harmless / honest (tiny judges; eval/)", 1),
        f"Reproduce with: `{eval_cmd}`",
    ]
    report = "\n".join(summary) + "\n"
    results = {
        "seed": seed,
        "quick": quick,
        "experts_implementation": trainer.experts_implementation,
        "seconds": elapsed,
        "categories": names,
        "losses": rows,
        "best_aligned": best_aligned,
        "fused_minus_best_aligned": margin,
        "routing_accuracy_untrained": routing_before["accuracy"],
        "routing_accuracy": routing["accuracy"],
        "routing_overall_accuracy": routing["overall_accuracy"],
        "train_log": trainer.state.log_history,
        "evaluation": evaluation,
    }
    atomic_write_text(os.path.join(out_dir, "report.md"), report)
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    echo("\n" + report)
    return results
