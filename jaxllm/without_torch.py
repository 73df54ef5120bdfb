"""Keep PyTorch out of the server's own processes. transformers (the tokenizer, the config classes) imports torch
whenever it is installed, and nothing of jaxllm runs it: in each process of `python -m jaxllm.serve` (the HTTP
frontend, the engine core, the mask worker, the tensor-parallel followers) that import cost seconds of CPU at
start-up (docs/perf.md). Called first thing by those processes' entry points, never on import: a program that
imports jaxllm beside its own PyTorch (the tests' oracles, a user's script) keeps it."""

from __future__ import annotations

import logging
import sys


def _not_the_missing_torch_notice(record: logging.LogRecord) -> bool:
    return "PyTorch was not found" not in record.getMessage()


def hide_torch() -> None:
    """From now on `import torch` fails in this process and transformers takes torch for absent (its check,
    `importlib.util.find_spec`, answers None for a module mapped to None), without its notice saying so. A no-op
    where torch is already imported."""
    if "torch" in sys.modules:
        return
    sys.modules["torch"] = None
    logging.getLogger("transformers").addFilter(_not_the_missing_torch_notice)
