"""Helpful / harmless / honest evaluation (`h3fusion eval`, `h3fusion.evaluate`): TruthfulQA MC1/MC2 scored as
lm-evaluation-harness does, judged generations for TruthfulQA, harmful prompts and helpful prompts, and the
paper's Table-1 report. Modules: data (loading), truthfulqa (MC scoring), generation, judges, metrics, samples
(resumable per-sample logs), runner (`evaluate`), report, demo_eval (the demo's closing evaluation)."""

from .runner import SUITES, evaluate  # noqa: F401
from .truthfulqa import mc1_score, mc2_score  # noqa: F401
