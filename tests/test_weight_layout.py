"""The loader's layout change on the devices (jaxllm/weight_transfer.py; of every tensor here, small ones
included) gives, bit for bit, what the family's transforms and fusions give on the host, each param sharded as
the model declares, at --tp 1 and 2 (experts split, or placed whole per device); each device is sent the slice
of a stored tensor that its slice of the param needs."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.registry import family_of
from jaxllm.parallel import make_mesh, with_expert_placement
from jaxllm import weight_transfer
from jaxllm.weight_transfer import Layout, assemble, contiguous, source_spec
from jaxllm.weights import abstract_params, hf_weight_files, load_hf, param_shardings, read_weight_file, tree_get
from tests.models.hf_oracle import saved_random_hf_model
from tests.models.test_moe_families import FAMILIES

# Mixtral: q/k/v and gate/up fused, each layer's experts stacked into one param.
MIXTRAL = dict(FAMILIES["mixtral"], num_hidden_layers=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    saved_random_hf_model(MIXTRAL, path)
    return path


def host_layout(model, path: Path) -> dict:
    """Every param as the host-side loader built it: each stored tensor through its numpy transform, fused
    params assembled from their parts, cast to the declared dtype."""
    config = model.config
    table = family_of(config.model_type).weights(config)
    shapes = nn.unbox(abstract_params(model))
    stored = {name: array for file in hf_weight_files(path) for name, array in read_weight_file(file).items()}
    parts: dict = {}
    for name, target in table.items():
        parts.setdefault(target.path, []).append((target.part, np.asarray(target.transform(stored[name]))))
    built = {}
    for param, pieces in parts.items():
        like = tree_get(shapes, param)
        host = assemble(like.shape, pieces) if len(pieces) > 1 else pieces[0][1]
        built[param] = contiguous(host, like.dtype)
    return built


@pytest.mark.parametrize("tp,placement", [(1, "split"), (2, "split"), (2, "per_device")])
def test_device_layout_is_the_host_layout_bit_for_bit(checkpoint, tp, placement, monkeypatch):
    monkeypatch.setattr(weight_transfer, "HOST_LAYOUT_BYTES", 0)  # every tensor changed on the devices
    config = with_expert_placement(ModelConfig.from_model_dir(checkpoint), placement)
    model = build_model(config, jnp.bfloat16)  # float32 stored: cast too
    mesh = make_mesh(tp)
    params = load_hf(model, checkpoint, mesh, tp)
    shardings = param_shardings(model, mesh, tp)
    expected = host_layout(model, checkpoint)
    assert len(expected) == len(jax.tree.leaves(params))
    assert any(path[-1].startswith("experts_") for path in expected)  # stacked experts among them
    for path, want in expected.items():
        got = tree_get(params, path)
        assert got.sharding == tree_get(shardings, path), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16), err_msg=str(path))


def test_each_device_is_sent_the_stored_slice_its_param_slice_needs():
    mesh = make_mesh(2)
    spec = jax.sharding.PartitionSpec
    transposed = Layout(lambda w: w.T)
    q_in = Layout(lambda w: w.T.reshape(w.shape[1], 2, 3, 8))  # [heads * head_dim, D] → [D, kv, group, head_dim]
    # Column-parallel ([out, in] stored, the output split): whole rows; row-parallel: the input's columns.
    assert source_spec(transposed, (96, 32), np.float32, mesh, spec(None, "tp")) == spec("tp", None)
    assert source_spec(transposed, (32, 96), np.float32, mesh, spec("tp", None)) == spec(None, "tp")
    assert source_spec(q_in, (48, 32), np.float32, mesh, spec(None, "tp", None, None)) == spec("tp", None)
    # Axes a transform mixes otherwise: the stored tensor split on its first axis, the devices exchange.
    mixed = Layout(lambda w: jnp.concatenate([w[:4], w[4:]], axis=1))
    assert source_spec(mixed, (8, 6), np.float32, mesh, spec(None, "tp")) == spec("tp")
    assert source_spec(transposed, (96, 32), np.float32, mesh, spec()) == spec()  # replicated: whole
