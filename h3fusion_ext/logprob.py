"""linear_logprob op wrapper. INTERIM: delegates to the reference until the kernel lands (owner: logprob helper)."""

from .reference.logprob import linear_logprob

__all__ = ["linear_logprob"]
