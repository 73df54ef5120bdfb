"""`VisionConfig.family` → the `VisionFamily` serving it (`interface.py` says what one provides)."""

from __future__ import annotations

import importlib

from jaxllm.models.vision.interface import VisionFamily

_FAMILIES: dict[str, VisionFamily] = {}


def register(family: VisionFamily) -> VisionFamily:
    _FAMILIES[family.name] = family
    return family


def vision_family(name: str) -> VisionFamily:
    """The vision family `name`; ValueError lists those served."""
    _load_builtin()
    if name not in _FAMILIES:
        raise ValueError(f"vision family {name!r} is not served; jaxllm serves {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


_BUILTIN = ("clip", "qwen2_vl")  # modules of jaxllm.models.vision that register a family


def _load_builtin() -> None:
    # Imported on first use: each family module registers itself.
    for module in _BUILTIN:
        importlib.import_module(f"jaxllm.models.vision.{module}")
