"""Flags and argument types shared by several subcommands: one definition each.

Argument types raise `argparse.ArgumentTypeError`, so a bad value ends in argparse's one-line usage error with exit
status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

__all__ = [
    "CATEGORY_RE",
    "add_data_arguments",
    "add_device_argument",
    "add_overwrite_argument",
    "comma_floats",
    "comma_names",
    "data_spec",
    "finite_float",
    "int_or_minus_one",
    "load_data_arguments",
    "load_pretrained",
    "max_shard_size",
    "model_path",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "prompt_template",
    "resolve_device",
    "unit_interval",
]

# A category / expert name as `--data CATEGORY=FILE` accepts it: letters, digits, "_" and "-", nothing else.
CATEGORY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _int(text: str, expected: str) -> int:
    """`int(text)`, or the argparse error "expected <expected>, got <text>"."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def top_p(text: str) -> float:
    """argparse type: a nucleus mass in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def int_or_minus_one(text: str) -> int:
    """argparse type: an integer >= 1, or -1 for "no limit" (e.g. --max-steps)."""
    value = _int(text, "a positive integer or -1")
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1 (no limit), got {value}")
    return value


def comma_floats(text: str) -> list[float]:
    """argparse type: one or more finite floats >= 0 separated by commas ("0.01" or "0.01,0,1e-3")."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return [nonneg_float(p) for p in parts]


def comma_names(choices: tuple[str, ...] | None = None):
    """argparse type factory: comma-separated names (each non-empty, from `choices` when given), in order, no repeats.

    An empty list ("" or ",") is an error rather than "everything" or "nothing".
    """

    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not n for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated names without empty items, got {text!r}")
        if choices is not None:
            unknown = [n for n in names if n not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown name(s) {unknown}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))

    return parse


def data_spec(text: str) -> tuple[str | None, str]:
    """argparse type of `--data [CATEGORY=]FILE` -> (category or None, path).

    The rule: the value is CATEGORY=FILE when the text before its first "=" is a category name (letters, digits,
    "_" and "-" only); otherwise the whole value is the file path. So `honest=data/b.json` sets the category,
    `data/k=v.json` is a path, and a path that itself starts with a name and "=" is written `./k=v.json`.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected [CATEGORY=]FILE, got an empty value")
    head, sep, tail = text.partition("=")
    if sep and CATEGORY_RE.fullmatch(head):
        if not tail:
            raise argparse.ArgumentTypeError(f"expected CATEGORY=FILE, got {text!r} (no file after '=')")
        return head, tail
    return None, text


def prompt_template(text: str) -> str:
    """argparse type: a str.format prompt template whose only fields are {instruction} and {input}."""
    from string import Formatter

    allowed = {"instruction", "input"}
    try:
        fields = [f for _, f, _, _ in Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
        ) from None
    unknown = sorted({f for f in fields if f not in allowed})
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown template field(s) {', '.join('{' + f + '}' for f in unknown)}; only {{instruction}} and "
            "{input} exist (write a literal brace as {{ or }})"
        )
    if "instruction" not in fields:
        raise argparse.ArgumentTypeError("the template must contain {instruction}")
    return text


_SHARD_RE = re.compile(r"(\d+)(GIB|MIB|KIB|GB|MB|KB)?", re.IGNORECASE)


def max_shard_size(text: str) -> str | int:
    """argparse type: a safetensors shard size as transformers accepts it: bytes, or an integer + unit (5GB, 500MiB)."""
    match = _SHARD_RE.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB, 500MB, 2GiB or a number of bytes, got {text!r}")
    return text.strip() if match.group(2) else int(match.group(1))


_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_path(text: str) -> str:
    """argparse type: a model folder that exists, or a Hugging Face hub id ("org/name") when no such folder exists.

    A value that looks like a local path (absolute, starting with "." or "~", more than one "/", or a trailing "/")
    must exist, so a typo says "does not exist" rather than "not a valid repository id".
    """
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a model folder")
    if _HUB_ID_RE.fullmatch(text) and not text.startswith("."):
        return text  # maybe a hub id; `load_pretrained` says both possibilities if it fails
    raise argparse.ArgumentTypeError(f"the model folder {text} does not exist")


def load_pretrained(loader, path: str, what: str, **kwargs):
    """`loader.from_pretrained(path, **kwargs)` with a message naming `what` when `path` is neither a folder nor a hub
    model we can reach (instead of transformers' "not a valid model identifier" for a mistyped folder)."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        if os.path.isdir(path):
            raise ValueError(f"{what}: cannot load {path}: {exc}") from None
        raise ValueError(
            f"{what}: no folder {path} exists, and it could not be loaded as a Hugging Face hub model ({exc})"
        ) from None


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_device_argument(parser: argparse.ArgumentParser, *, indexed: bool = True) -> None:
    """The one `--device` flag of every subcommand that runs a model: cpu, cuda or cuda:N (default: cuda if any).

    Args:
        parser: the subcommand's parser (or an argument group).
        indexed: accept cuda:N (False for Trainer-based subcommands, which pick their GPUs from the launcher and
            CUDA_VISIBLE_DEVICES).

    The old spellings `--cpu` and `--no-cuda` stay accepted as hidden, deprecated aliases of `--device cpu`.
    """
    parser.add_argument(
        "--device",
        default=None,
        type=_device if indexed else _plain_device,
        metavar="DEVICE",
        help=("cpu, cuda or cuda:N" if indexed else "cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES)")
        + " (default: cuda when a GPU is available, else cpu)",
    )
    for old in ("--cpu", "--no-cuda"):
        parser.add_argument(old, dest="device", nargs=0, action=_DeprecatedCpu, help=argparse.SUPPRESS)


class _DeprecatedCpu(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --device cpu", file=sys.stderr)
        setattr(namespace, self.dest, "cpu")


def _device(text: str) -> str:
    head, _, index = text.partition(":")
    bad_index = (index and not index.isdigit()) or (head == "cpu" and index) or text.endswith(":")
    if head not in {"cpu", "cuda"} or bad_index:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _plain_device(text: str) -> str:
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r} (select GPUs with CUDA_VISIBLE_DEVICES)")
    return text


def resolve_device(args: argparse.Namespace) -> str:
    """The device a subcommand runs on: `--device`, else cuda when available, else cpu (imports torch).

    Raises:
        ValueError: --device names a CUDA device that is not there.
    """
    import torch

    device = getattr(args, "device", None)
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`: replace a previous h3fusion output in --out (a folder of anything else is never replaced)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous h3fusion output in --out (other folders are never replaced)",
    )


def add_data_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--data [CATEGORY=]FILE` (repeatable): JSON/JSONL instruction records; CATEGORY fills missing categories."""
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        type=data_spec,
        metavar="[CATEGORY=]FILE",
        help="JSON/JSONL records {instruction, input?, output, category}; repeat per file; CATEGORY= (letters, "
        "digits, _ and - before the first '=') sets the category of records without one; write ./k=v.json for a "
        "file name that starts with such a word and '='",
    )


def load_data_arguments(specs: list[tuple[str | None, str]]):
    """The examples of the `--data` values (parsed by `data_spec`), in order, as a list of InstructionExample.

    Raises:
        ValueError: a file does not exist or holds invalid records (the message names it).
    """
    from h3fusion.data import load_instructions

    examples = []
    for category, path in specs:
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "does not exist"
            hint = ""
            if category is not None and os.path.exists(f"{category}={path}"):
                hint = f" (the value was read as CATEGORY=FILE; for the file itself write ./{category}={path})"
            raise ValueError(f"--data: {path} {what}; expected a JSON or JSONL file{hint}")
        examples.extend(load_instructions(path, category=category))
    return examples


# the choices of h3fusion.models.hf_experts.EXPERTS_IMPLEMENTATIONS (spelt out: this module must not import torch)
EXPERTS_IMPLEMENTATIONS = ("h3fusion", "grouped_mm", "eager")


def add_experts_implementation_argument(parser: argparse.ArgumentParser) -> None:
    """`--experts-implementation`: what runs the MoE blocks (default h3fusion: topk_route + moe_ffn)."""
    parser.add_argument(
        "--experts-implementation",
        choices=EXPERTS_IMPLEMENTATIONS,
        default="h3fusion",
        help="what runs the MoE blocks: h3fusion (our topk_route + moe_ffn kernels), or transformers' grouped_mm "
        "or eager (default: %(default)s)",
    )
