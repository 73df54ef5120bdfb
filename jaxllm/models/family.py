"""What a family module provides: the model types it serves, its config normalisation and its weight map."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxllm.config import ModelConfig
from jaxllm.models.hf_map import WeightMap


@dataclasses.dataclass(frozen=True)
class Family:
    """`config(raw)`: HF config.json dict → ModelConfig; `weights(config)`: HF tensor name → Target.
    `ignored(name)`: HF tensors the checkpoint may carry that the model does not use (buffers)."""

    model_types: tuple[str, ...]
    config: Callable[[dict[str, Any]], ModelConfig]
    weights: Callable[[ModelConfig], WeightMap]
    ignored: Callable[[str], bool] = lambda name: name.endswith("rotary_emb.inv_freq")
    # Whether the family's checkpoints may come as DeepSpeed pipeline files (--load_way DS).
    deepspeed: bool = False
    # The base model's prefix, which checkpoints saved from the bare base model lack ("transformer.").
    base_prefix: str = ""
    # Checkpoint tensor name → the name the weight map uses (vision-language checkpoints saved by different
    # transformers versions nest the language model differently).
    rename: Callable[[str], str] = lambda name: name
    # Tensors a given config never reads (a vision tower's layers past the features it selects).
    unused: Callable[[ModelConfig, str], bool] = lambda config, name: False
