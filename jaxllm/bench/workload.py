"""Benchmark workloads: prompts with target output lengths, fixed, random or from a JSONL file, fed by grain."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import grain
import numpy as np


_PREFIX_STREAM = 2**32 - 1  # the shared prefix's random stream, apart from every request index's


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int
    prompt_text: str | None = None  # set for JSONL datasets; else the server gets the decoded ids


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int
    input_len: int = 128
    output_len: int = 128
    input_len_max: int | None = None  # with *_max set, lengths are uniform in [len, len_max]
    output_len_max: int | None = None
    dataset: str | None = None  # JSONL: {"prompt": str, "output_len"?: int} per line
    seed: int = 0
    shared_prefix_len: int = 0  # random prompts open with the same this many tokens (prompt-cache workloads)
    vocab_low: int = 100  # random ids avoid the low special-token range of most vocabularies
    vocab_high: int = 30000


def _random_request(spec: WorkloadSpec, index: int) -> BenchRequest:
    rng = np.random.default_rng((spec.seed, index))
    n_in = int(rng.integers(spec.input_len, (spec.input_len_max or spec.input_len) + 1))
    n_out = int(rng.integers(spec.output_len, (spec.output_len_max or spec.output_len) + 1))
    ids = tuple(int(t) for t in rng.integers(spec.vocab_low, spec.vocab_high, size=n_in))
    return BenchRequest(prompt_ids=shared_prefix(spec) + ids, output_len=n_out)


@functools.lru_cache(maxsize=4)
def shared_prefix(spec: WorkloadSpec) -> tuple[int, ...]:
    """The opening every random prompt of `spec` shares (empty unless shared_prefix_len)."""
    rng = np.random.default_rng((spec.seed, _PREFIX_STREAM))
    return tuple(int(t) for t in rng.integers(spec.vocab_low, spec.vocab_high, size=spec.shared_prefix_len))


def _dataset_request(spec: WorkloadSpec, tokenizer, record: dict) -> BenchRequest:
    text = record["prompt"]
    return BenchRequest(
        prompt_ids=tuple(tokenizer.encode(text)),
        output_len=int(record.get("output_len", spec.output_len)),
        prompt_text=text,
    )


def build_workload(spec: WorkloadSpec, tokenizer=None) -> grain.MapDataset:
    """A grain MapDataset of BenchRequest, deterministic for a given seed."""
    if spec.dataset is None:
        if spec.shared_prefix_len < 0:
            raise ValueError("shared_prefix_len must be ≥ 0")
        return grain.MapDataset.range(spec.num_prompts).map(lambda i: _random_request(spec, int(i)))
    if spec.shared_prefix_len:
        raise ValueError("shared_prefix_len applies to random prompts, not to a JSONL dataset")
    if tokenizer is None:
        raise ValueError("a JSONL dataset needs a tokenizer to count prompt tokens")
    lines = [line for line in Path(spec.dataset).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    if not records:
        raise ValueError(f"dataset {spec.dataset} is empty")
    dataset = grain.MapDataset.source(records).shuffle(seed=spec.seed).repeat()
    return dataset[: spec.num_prompts].map(lambda r: _dataset_request(spec, tokenizer, r))
