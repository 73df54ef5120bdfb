"""GPU kernels for jaxllm (`kernels.pallas`).

The package's name is also that of Hugging Face's `kernels` (the Kernel Hub loader), which transformers 5.25 and
later import at start: where this package comes first on the path it shadows that one, and such an import would
fail with a bare "cannot import name". A public name this package lacks raises an ImportError that says why
instead (pyproject.toml keeps transformers below 5.25 for this reason)."""

import importlib.util


def __getattr__(name: str):
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise ImportError(
        f"cannot import {name!r} from 'kernels': this is jaxllm's kernels package ({__path__[0]}), not Hugging "
        "Face's `kernels`, which transformers 5.25 and later need; install transformers<5.25 (as jaxllm's "
        "pyproject.toml asks), or run from a directory where jaxllm's `kernels` is not first on sys.path",
        name=__name__)
