"""Exit codes and the errors that map to them.

The SkyPilot recovery settings (sky/train.yaml) and the README's table follow this table:
only TRANSIENT is worth an automatic retry; a bad setting or input fails the same way twice.
"""

from __future__ import annotations

OK = 0
BUG = 1  # an unexpected exception: a defect in this project, report it
BAD_CONFIG = 2  # bad setting or input data: fix it, a retry fails the same way
OUT_OF_MEMORY = 3  # GPU memory ran out: lower BATCH_SIZE or MAX_SEQ_LENGTH
TRANSIENT = 4  # the Hub or network failed: retrying later may succeed
SAFETY_GATE = 5  # a quality gate (safety screen, benchmark drop) stopped the push: nothing was pushed

EXIT_CODES = {
    OK: "success",
    BUG: "unexpected error (a bug: please report it with the log)",
    BAD_CONFIG: "bad setting or input: fix what the message names; retrying will not help",
    OUT_OF_MEMORY: "out of GPU memory: lower BATCH_SIZE or MAX_SEQ_LENGTH, or turn on GRADIENT_CHECKPOINTING",
    TRANSIENT: "Hub or network failure: retry later (managed cloud jobs retry this automatically)",
    SAFETY_GATE: "a quality gate (MIN_SAFETY_PASS_RATE or MAX_BENCHMARK_DROP) stopped the push: nothing was pushed",
}
RETRYABLE = (TRANSIENT,)


class JobError(Exception):
    exit_code = BUG


class ConfigError(JobError):
    """A setting or an input (data file, model, token) is wrong; the message says which and how to fix it."""

    exit_code = BAD_CONFIG


class OutOfMemory(JobError):
    exit_code = OUT_OF_MEMORY


class TransientError(JobError):
    exit_code = TRANSIENT


class SafetyGateError(JobError):
    exit_code = SAFETY_GATE
