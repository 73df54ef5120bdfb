"""The `kernels` package itself: what a caller looking for Hugging Face's `kernels` package meets."""

import importlib

import pytest


def test_a_name_of_hugging_faces_kernels_raises_a_clear_import_error():
    """transformers 5.25+ runs `from kernels import ...` at start; our package shadows Hugging Face's where it
    comes first on the path, and says so rather than a bare "cannot import name"."""
    with pytest.raises(ImportError, match="transformers<5.25"):
        exec("from kernels import CUDAProperties", {})
    assert not hasattr(importlib.import_module("kernels"), "_private_probe")  # private names: a plain AttributeError


def test_its_own_subpackages_still_import():
    namespace = {}
    exec("from kernels import pallas", namespace)
    assert namespace["pallas"].__name__ == "kernels.pallas"
    assert importlib.import_module("kernels.pallas.reference").__name__ == "kernels.pallas.reference"
