"""Model weights onto the mesh: Hugging Face safetensors (single file or sharded index), orbax, or random.

Every loader returns the same pytree of plain arrays, each placed with the sharding that its logical axes
(declared once in the model) map to under `jaxllm/parallel.py`'s rules.
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from pathlib import Path
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxllm import prequant
from jaxllm.models import init_kv_cache, quant
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.registry import family_of
from jaxllm.parallel import logical_rules
from jaxllm.torch_pickle import load_torch_file
from jaxllm.weight_transfer import Layout, Placer, assemble, place, place_fused, put

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
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
}


def _dummy_inputs(model):
    """The smallest valid step (one token, one scratch slot) for tracing `init`."""
    meta = AttentionMetadata.for_sequences([(0, 1)], [[0]], scratch_slot=1, width=1)
    return jnp.zeros((1,), jnp.int32), meta, init_kv_cache(model, 1)


def abstract_params(model):
    """Shapes, dtypes and logical axes of every weight, without allocating any (traced once per model: the trace
    of the whole model's init takes seconds)."""
    abstract = _abstract.get(model)
    if abstract is None:
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_dummy_inputs(model))["params"])
        _abstract[model] = abstract
    return abstract


_abstract: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def param_shardings(model, mesh: Mesh, tp: int):
    """NamedSharding for every weight, from its declared logical axes."""
    abstract = abstract_params(model)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, logical_rules(model.config, tp))
    _check_quantised_split(nn.unbox(abstract), shardings, tp)
    return shardings


def placed_shapes(model, mesh: Mesh, tp: int):
    """Every weight's shape, dtype and sharding as the loaders place it: what compiling a step needs of them."""
    shardings = param_shardings(model, mesh, tp)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract_params(model)), shardings)


def _check_quantised_split(abstract, shardings, tp: int) -> None:
    """A quantised weight's scales (int4: per group of inputs) must split over --tp like its data."""
    for path, weight in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=quant.is_quantised)[0]:
        if not quant.is_quantised(weight):
            continue
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        sharding = tree_get(shardings, tuple(getattr(k, "key", k) for k in path))
        for field, spec in zip(jax.tree.leaves(weight), jax.tree.leaves(sharding)):
            for size, axis in zip(field.shape, spec.spec):
                if axis is not None and size % tp:
                    raise ValueError(f"{name}: a {type(weight).__name__} field of shape {field.shape} cannot be "
                                     f"split over --tp {tp} (int4 groups of {getattr(weight, 'group_size', '-')})")


def random_params(model, mesh: Mesh, tp: int, seed: int = 0):
    """Random weights generated directly on the mesh (benchmarks with real configs, tests)."""
    shardings = param_shardings(model, mesh, tp)
    init = jax.jit(
        lambda key: nn.unbox(model.init(key, *_dummy_inputs(model))["params"]), out_shardings=shardings
    )
    # XLA's RngBitGenerator ("rbg"): threefry's temporaries reached 3.6x the weights (335 GB for Mixtral-8x7B's
    # 93 GB in XLA's memory analysis), rbg's stay under the largest weight.
    return init(jax.random.key(seed, impl="rbg"))


# --- Hugging Face layout (each family says where its tensors go: jaxllm/models/<family>.py) ----------

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


def hf_weight_files(model_dir: Path) -> list[Path]:
    """LightLLM's HF rule: `*.safetensors` (through the index when sharded) if any, else `*.bin`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {model_dir}")
    return files


def read_weight_file(path: Path) -> dict[str, np.ndarray]:
    """name → array of one `.safetensors` or torch `.bin` file."""
    return read_safetensors(path) if path.suffix == ".safetensors" else load_torch_file(path)


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    files = hf_weight_files(model_dir)
    for file in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        yield from read_weight_file(file).items()


_DS_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_DS_CONCAT_OUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split along the output dim
_DS_CONCAT_IN = ("o_proj", "down_proj")  # split along the input dim


def _ds_tensors(model_dir: Path, num_layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """DeepSpeed pipeline files → HF names: layer 1 embeddings, 3..3+L-1 blocks, L+4 norm, L+5 lm_head;
    the model_MM shards of one layer are concatenated (LightLLM's DS layout)."""
    by_layer: dict[int, list[tuple[int, Path]]] = {}
    for file in model_dir.iterdir():
        m = _DS_FILE.match(file.name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append((int(m.group(2)), file))
    if not by_layer:
        raise FileNotFoundError(f"no DeepSpeed layer_NN-model_MM-model_states.pt files in {model_dir}")
    for layer in tqdm(sorted(by_layer), desc="loading DS layers", unit="layer"):
        merged: dict[str, np.ndarray] = {}
        for _, file in sorted(by_layer[layer]):
            for key, array in load_torch_file(file).items():
                if key in merged and any(p in key for p in _DS_CONCAT_OUT):
                    array = np.concatenate([merged[key], array], axis=0)
                elif key in merged and any(p in key for p in _DS_CONCAT_IN):
                    array = np.concatenate([merged[key], array], axis=1)
                merged[key] = array
        for key, array in merged.items():
            if layer == 1:
                yield "model.embed_tokens.weight", array
            elif 3 <= layer < 3 + num_layers:
                yield f"model.layers.{layer - 3}.{key}", array
            elif layer == num_layers + 4:
                yield "model.norm.weight", array
            elif layer == num_layers + 5:
                yield "lm_head.weight", array


def load_hf(model, model_dir: str | Path, mesh: Mesh, tp: int, load_way: str = "HF"):
    """Load Hugging Face-named weights (HF files, or DeepSpeed files with `load_way="DS"`), cast to each
    param's declared dtype (the model's, or float32 where a family keeps one so), each device receiving only
    its shard."""
    model_dir = Path(model_dir)
    config = model.config
    family = family_of(config.model_type)
    if load_way == "DS":
        if not family.deepspeed:
            raise ValueError(f"--load_way DS supports the Llama layout only, not {config.model_type}")
        tensors = _ds_tensors(model_dir, config.num_layers)
    else:
        tensors = _hf_tensors(model_dir)
    held = config.weight_quant
    if held is not None and held.checkpoint_format is not None:  # AWQ / GPTQ / FP8 tensors, read as they are
        tensors = prequant.regroup(tensors, held.checkpoint_format, held.group_size)
    shardings = param_shardings(model, mesh, tp)
    with Placer() as placer:
        return placer.result(_place_all(model, tensors, shardings, placer, model_dir))


def _place_all(model, tensors, shardings, placer: Placer, model_dir: Path) -> dict:
    """load_hf's loop: each named tensor to its param (fused params once all their parts are read), moved to the
    devices as stored and changed into the param's layout there, in `placer`'s threads (the tree holds their
    Futures)."""
    config = model.config
    family = family_of(config.model_type)
    shapes = nn.unbox(abstract_params(model))
    table = family.weights(config)
    params: dict = {}
    seen = set()
    pending: dict[tuple[str, ...], list] = {}  # fused params: the parts read so far [(index, host array, Layout)]
    for name, array in tensors:
        name = family.rename(name)
        if name not in table and family.base_prefix + name in table:
            name = family.base_prefix + name
        if name not in table:
            if family.ignored(name) or family.unused(config, name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue
            raise ValueError(f"{model_dir}: unexpected tensor {name} for {config.model_type}")
        target = table[name]
        seen.add(name)
        like, sharding = tree_get(shapes, target.path), tree_get(shardings, target.path)
        if isinstance(array, dict):  # pre-quantised: a dict of fields, each in the 16-bit weight's layout
            parts = _parts_so_far(pending, target, {field: np.asarray(target.transform(a)) for field, a in array.items()})
            if parts is None:
                continue
            if target.parts > 1:
                host = {field: assemble(like.shape, [(i, p[field]) for i, p, _ in parts]) for field in parts[0][1]}
            else:
                host = parts[0][1]
            weight = prequant.to_weight(host, like)
            tree_set(params, target.path, jax.tree.map(put, weight, sharding))
            continue
        parts = _parts_so_far(pending, target, array)
        if parts is None:
            continue
        if quant.is_quantised(like):  # a 16-bit source for a param the model declares quantised
            placed = placer.submit(_place_quantised, parts, target.parts > 1, like, sharding, model.dtype)
        elif target.parts > 1:
            placed = placer.submit(place_fused, like.shape, parts, like.dtype, sharding)
        else:  # the declared dtype: the model's, or float32 where a family keeps one so (DeepSeek's router)
            placed = placer.submit(place, parts[0][1], parts[0][2], like.dtype, sharding)
        tree_set(params, target.path, placed)
    missing = sorted(set(table) - seen)
    if missing:
        raise ValueError(f"weights in {model_dir} lack {len(missing)} tensors, e.g. {missing[:3]}")
    return params


def _parts_so_far(pending: dict, target, host) -> list | None:
    """[(index, host, Layout)] of `target`'s param once all its parts are read (one part for a plain param);
    None while a fused param waits for more."""
    part = (target.part, host, Layout(target.transform))
    if target.parts == 1:
        return [part]
    parts = pending.setdefault(target.path, [])
    parts.append(part)
    if len(parts) < target.parts:
        return None
    return pending.pop(target.path)


def _place_quantised(parts: list, fused: bool, like, shardings, dtype):
    """Quantise on the devices: the 16-bit twin built on the devices like the quantised fields, then quantised
    in place."""
    sharding = jax.tree.leaves(shardings)[0]
    if fused:
        twin = place_fused(like.shape, parts, dtype, sharding)
    else:
        twin = place(parts[0][1], parts[0][2], dtype, sharding)
    return _quantiser(like, shardings)(twin)  # `like`: ShapeDtypeStructs, hashable


@functools.lru_cache(maxsize=None)
def _quantiser(like, shardings):
    # One jitted quantiser per weight layout and sharding: the layers of a model share them.
    return jax.jit(lambda w: quant.quantize_like(w, like), out_shardings=shardings)


def tree_get(tree, path):
    """The leaf at `path` (a tuple of keys) of nested dicts."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree, path, value):
    """Put `value` at `path` of nested dicts, making the dicts on the way."""
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

    target = placed_shapes(model, mesh, tp)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((Path(model_dir) / ORBAX_SUBDIR).resolve(), target)


def load_params(
    model, model_dir: str | Path, mesh: Mesh, tp: int, load_format: str = "auto", seed: int = 0, load_way: str = "HF"
):
    """Weights by format: "dummy" (random), "orbax", "hf", or "auto" (orbax dir if present, else HF);
    `load_way` ("HF" or "DS") picks the file layout of Hugging Face-named weights."""
    model_dir = Path(model_dir)
    if load_format == "dummy":
        return random_params(model, mesh, tp, seed)
    if load_format == "orbax" or (load_format == "auto" and (model_dir / ORBAX_SUBDIR).is_dir()):
        return load_orbax(model, model_dir, mesh, tp)
    return load_hf(model, model_dir, mesh, tp, load_way)
