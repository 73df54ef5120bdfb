"""hide_torch: a server process's transformers loads SmolLM2's tokenizer and config without importing PyTorch, and
says nothing about it."""

import subprocess
import sys

PROBE = """
import sys
from jaxllm.without_torch import hide_torch
hide_torch()
from transformers import AutoConfig, AutoTokenizer
config = AutoConfig.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
assert sys.modules["torch"] is None, "torch was imported"
print(config.model_type, tokenizer("The capital of France")["input_ids"])
"""


def test_tokenizer_and_config_load_without_torch(smollm2_dir):
    from transformers import AutoTokenizer

    run = subprocess.run([sys.executable, "-c", PROBE, str(smollm2_dir)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model_type, ids = run.stdout.split(" ", 1)
    assert model_type == "llama"
    assert ids.strip() == str(AutoTokenizer.from_pretrained(str(smollm2_dir))("The capital of France")["input_ids"])
    assert "PyTorch was not found" not in run.stderr


def test_a_process_that_imported_torch_keeps_it():
    run = subprocess.run([sys.executable, "-c", "import torch, sys; from jaxllm.without_torch import hide_torch; "
                          "hide_torch(); import torch as again; print(again.tensor([2, 3]).sum().item())"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "5", run.stderr
