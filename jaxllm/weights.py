"""Model weights onto the mesh: Hugging Face safetensors (single file or sharded index), orbax, or random.

Every loader returns the same pytree of plain arrays, each placed with the sharding that its logical axes
(declared once in the model) map to under `jaxllm/parallel.py`'s rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import logical_rules

DATA_TYPES = {
    "fp16": jnp.float16,
    "float16": jnp.float16,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "fp32": jnp.float32,
    "float32": jnp.float32,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}


def _dummy_inputs(model):
    """The smallest valid step (one token, one scratch slot) for tracing `init`."""
    c = model.config
    meta = AttentionMetadata.for_sequences([(0, 1)], [[0]], scratch_slot=1, width=1)
    cache = tuple(
        model.backend.init_layer_cache(1, c.num_kv_heads, c.head_dim, model.dtype) for _ in range(c.num_layers)
    )
    return jnp.zeros((1,), jnp.int32), meta, cache


def abstract_params(model):
    """Shapes, dtypes and logical axes of every weight, without allocating any."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(model))["params"])


def param_shardings(model, mesh: Mesh, tp: int):
    """NamedSharding for every weight, from its declared logical axes."""
    specs = nn.get_partition_spec(abstract_params(model))
    return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(model.config, tp))


def random_params(model, mesh: Mesh, tp: int, seed: int = 0):
    """Random weights generated directly on the mesh (benchmarks with real configs, tests)."""
    shardings = param_shardings(model, mesh, tp)
    init = jax.jit(
        lambda key: nn.unbox(model.init(key, *_dummy_inputs(model))["params"]), out_shardings=shardings
    )
    return init(jax.random.PRNGKey(seed))


# --- Hugging Face layout -------------------------------------------------------------------------

def _hf_to_ours(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
    """HF tensor name → (our param path, transform of the HF array to our layout)."""
    h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
    heads_in = lambda n: lambda w: w.T.reshape(w.shape[1], n, d)  # noqa: E731  [n*d, D] → [D, n, d]
    heads_bias = lambda n: lambda b: b.reshape(n, d)  # noqa: E731
    same = lambda w: w  # noqa: E731
    table = {
        "model.embed_tokens.weight": (("embed_tokens",), same),
        "model.norm.weight": (("norm", "weight"), same),
    }
    if not config.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head",), lambda w: w.T)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        table.update({
            hf + "self_attn.q_proj.weight": ((ours, "self_attn", "q_proj"), heads_in(h)),
            hf + "self_attn.k_proj.weight": ((ours, "self_attn", "k_proj"), heads_in(kv)),
            hf + "self_attn.v_proj.weight": ((ours, "self_attn", "v_proj"), heads_in(kv)),
            hf + "self_attn.o_proj.weight": ((ours, "self_attn", "o_proj"), lambda w: w.T.reshape(h, d, w.shape[0])),
            hf + "mlp.gate_proj.weight": ((ours, "mlp", "gate_proj"), lambda w: w.T),
            hf + "mlp.up_proj.weight": ((ours, "mlp", "up_proj"), lambda w: w.T),
            hf + "mlp.down_proj.weight": ((ours, "mlp", "down_proj"), lambda w: w.T),
            hf + "input_layernorm.weight": ((ours, "input_layernorm", "weight"), same),
            hf + "post_attention_layernorm.weight": ((ours, "post_attention_layernorm", "weight"), same),
        })
        if config.qkv_bias:
            table.update({
                hf + "self_attn.q_proj.bias": ((ours, "self_attn", "q_bias"), heads_bias(h)),
                hf + "self_attn.k_proj.bias": ((ours, "self_attn", "k_bias"), heads_bias(kv)),
                hf + "self_attn.v_proj.bias": ((ours, "self_attn", "v_bias"), heads_bias(kv)),
            })
    return table


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file (bf16 included, which numpy alone cannot read)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    header_len = int(np.frombuffer(raw[:8].tobytes(), "<u8")[0])
    header = json.loads(raw[8 : 8 + header_len].tobytes())
    base = 8 + header_len
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        arrays[name] = raw[base + start : base + end].view(dtype).reshape(info["shape"])
    return arrays


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def load_hf(model, model_dir: str | Path, mesh: Mesh, tp: int):
    """Load HF safetensors weights, cast to the model's dtype, each device receiving only its shard."""
    model_dir = Path(model_dir)
    shardings = param_shardings(model, mesh, tp)
    table = _hf_to_ours(model.config)
    params: dict = {}
    seen = set()
    files = safetensors_files(model_dir)
    for file in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        for name, array in read_safetensors(file).items():
            if name not in table:
                if re.search(r"rotary_emb\.inv_freq$", name):
                    continue
                raise ValueError(f"{file.name}: unexpected tensor {name} for {model.config.model_type}")
            path, transform = table[name]
            host = np.asarray(transform(array))
            sharding = _get(shardings, path)
            _set(params, path, _place(host, model.dtype, sharding))
            seen.add(name)
    missing = sorted(set(table) - seen)
    if missing:
        raise ValueError(f"weights in {model_dir} lack {len(missing)} tensors, e.g. {missing[:3]}")
    return params


def _place(host: np.ndarray, dtype, sharding: NamedSharding):
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: np.asarray(host[index]).astype(dtype)
    )


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- orbax ---------------------------------------------------------------------------------------

ORBAX_SUBDIR = "orbax"


def save_orbax(params, model_dir: str | Path) -> Path:
    """Write params as an orbax checkpoint under model_dir/orbax (restorable onto any mesh)."""
    import orbax.checkpoint as ocp

    target = (Path(model_dir) / ORBAX_SUBDIR).resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params, force=True)
    return target


def load_orbax(model, model_dir: str | Path, mesh: Mesh, tp: int):
    """Restore an orbax checkpoint straight into the mesh's shardings."""
    import orbax.checkpoint as ocp

    abstract = nn.unbox(abstract_params(model))
    shardings = param_shardings(model, mesh, tp)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, model.dtype, sharding=s), abstract, shardings
    )
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((Path(model_dir) / ORBAX_SUBDIR).resolve(), target)


def load_params(model, model_dir: str | Path, mesh: Mesh, tp: int, load_format: str = "auto", seed: int = 0):
    """Weights by format: "dummy" (random), "orbax", "hf", or "auto" (orbax dir if present, else HF)."""
    model_dir = Path(model_dir)
    if load_format == "dummy":
        return random_params(model, mesh, tp, seed)
    if load_format == "orbax" or (load_format == "auto" and (model_dir / ORBAX_SUBDIR).is_dir()):
        return load_orbax(model, model_dir, mesh, tp)
    return load_hf(model, model_dir, mesh, tp)
