"""The engine's compiled step under --tp, read from its optimised HLO: collectives per layer (kind, data type,
shape), large copies or transposes (a layer's whole K or V buffer, or an eighth of a hidden × hidden weight,
or more), and the entry computation's instructions by opcode (to compare two trees' programs). No weights are
allocated (the step is lowered on abstract params), so a real config's shapes fit on a laptop's fake CPU devices;
`--interpret` compiles the GPU's attention path there (the Pallas kernels per device under shard_map, in interpret
mode) instead of the CPU's plain-JAX attention:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      python -m jaxllm.bench.hlo --config tests/assets/configs/llama-3-8b.json --layers 2 --tp 2 --rows 1 --interpret
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from jaxllm.config import ModelConfig
from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.runner import ModelRunner
from jaxllm.engine.step_shapes import StepShape
from jaxllm.models import build_model
from jaxllm.models.backends import attention_backend, resolve_modes
from jaxllm.models.quant import with_weight_mode
from jaxllm.models.expert_kernels import experts_kernel
from jaxllm.parallel import kv_cache_spec, make_mesh, with_expert_placement
from jaxllm.weights import DATA_TYPES, abstract_params, param_shardings, random_params

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An instruction line: `%name = f32[2,3]{1,0} op(...)` or a tuple result `(f32[..], ...) op(...)`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>\([^=]*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
                          r"(?P<op>[\w\-]+)(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
# An entry parameter holding a layer's KV buffer: `%p = bf16[264,4,128]{2,1,0} parameter(15), ... op_name="kv.layers`.
_KV_PARAMETER = re.compile(r"= \w+\[([\d,]*)\]\S* parameter\(\d+\).*op_name=\"kv\.layers")


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str
    types: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result

    @property
    def elements(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.types)

    def __str__(self) -> str:
        return f"{self.kind} " + ", ".join(f"{d}[{','.join(map(str, s))}]" for d, s in self.types)


def hlo_ops(text: str, kinds: tuple[str, ...]) -> list[Op]:
    """The instructions of `kinds` in an HLO module's text (async pairs counted once, at their start)."""
    ops = []
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        op = m.group("op")
        if op.endswith("-done") or op.removesuffix("-start") not in kinds:
            continue
        types = tuple((d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(m.group("type")))
        if op.endswith("-start") and len(types) > 1:  # an async start's tuple holds the operand and the result
            types = types[len(types) // 2:]
        ops.append(Op(op.removesuffix("-start"), types))
    return ops


def shrunk_config(path: str, layers: int, mode: list[str] = ()) -> ModelConfig:
    """A Hugging Face config.json's model with `layers` decoder layers, its weights quantised as `mode` asks."""
    raw = {**json.loads(Path(path).read_text()), "num_hidden_layers": layers}
    return with_weight_mode(ModelConfig.from_hf_dict(raw), resolve_modes(mode).weight_mode, raw)


def bench_runner(config: ModelConfig, tp: int, rows: int, dtype: str, mode: list[str], interpret: bool = False,
                 abstract: bool = True) -> ModelRunner:
    """An engine's runner for steps of up to `rows` rows (or prefill tokens) at `--tp`: on abstract params (to
    compile only) or random ones; `interpret`: the GPU's kernels (Pallas attention and experts, interpret mode) in
    place of the CPU's plain-JAX attention and XLA ragged dot. MoE experts placed as the engine places them."""
    mesh = make_mesh(tp)
    platform = jax.devices()[0].platform
    config = with_expert_placement(config)  # as the engine loads it ($JAXLLM_EXPERT_PLACEMENT)
    experts = experts_kernel(platform, mesh, config.moe.placement, interpret=interpret) if config.moe else None
    model = build_model(config, DATA_TYPES[dtype], attention_backend(mode, platform, interpret, mesh=mesh), experts)
    if abstract:
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.unbox(abstract_params(model)), param_shardings(model, mesh, tp))
    else:
        params = random_params(model, mesh, tp)
    kv = KVCache(max(4 * rows, 256), max(rows, 1))
    return ModelRunner(model, params, mesh, kv_cache_spec(config, tp), kv, max_len=256,
                       max_prefill_tokens=max(rows, 16), eos_ids=(), min_width=256)


def step_shape(runner: ModelRunner, rows: int, decode: bool = True) -> StepShape:
    """A greedy decode of `rows` rows, or a prefill of `rows` tokens, at the narrowest table."""
    return StepShape(rows, rows, 256, True) if decode else StepShape(rows, runner.prefill_rows(rows), 256, False)


def step_hlo(config: ModelConfig, tp: int, rows: int, dtype: str, mode: list[str], decode: bool = True,
             interpret: bool = False) -> str:
    """The optimised HLO of the engine's step (table updates, model, sampler) for a greedy decode of `rows` rows
    (or a prefill of `rows` tokens), the params abstract."""
    runner = bench_runner(config, tp, rows, dtype, mode, interpret)
    shape = step_shape(runner, rows, decode)
    return runner._compile(runner.inputs.padding(shape), shape).as_text()  # noqa: SLF001 - the step's executable


def kv_buffer_elements(text: str) -> int:
    """Elements of the largest per-layer KV buffer among the step's parameters (per device), 0 if none."""
    sizes = [int(np.prod([int(x) for x in m.group(1).split(",") if x]))
             for m in _KV_PARAMETER.finditer(text)]
    return max(sizes, default=0)


def entry_ops(text: str) -> dict[str, int]:
    """The entry computation's instructions by opcode (fusions, library calls, copies: what a step launches),
    and each custom call's target: to compare two trees' programs of one step."""
    entry = text[text.index("ENTRY"):]
    ops = collections.Counter(re.findall(r"= \S+ ([a-z][a-z\-]*)\(", entry))
    ops.update(f"custom-call {t}" for t in re.findall(r'custom_call_target="([^"]+)"', entry))
    return dict(sorted(ops.items()))


def summary(text: str, config: ModelConfig) -> dict:
    """Collectives (per kind, data type and shape, with counts) and large copies / transposes: as large as a
    layer's K or V buffer (a copy of the cache per step) or an eighth of a hidden × hidden weight; the entry
    computation's instructions by opcode. The CPU backend promotes bf16 all-reduces to f32 (its
    all-reduce-promotion pass): there, bf16 models show f32 all-reduces."""
    collectives = collections.Counter(str(op) for op in hlo_ops(text, COLLECTIVES))
    large = min(config.hidden_size * config.hidden_size // 8, kv_buffer_elements(text) or np.inf)
    moves = collections.Counter(str(op) for op in hlo_ops(text, ("copy", "transpose")) if op.elements >= large)
    return {"collectives": dict(collectives), "total_collectives": sum(collectives.values()),
            "collectives_per_layer": sum(collectives.values()) / config.num_layers, "large_copies": dict(moves),
            "entry_ops": entry_ops(text)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.hlo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--layers", type=int, default=2, help="decoder layers kept (the collectives repeat per layer)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="decode rows (or prefill tokens with --prefill)")
    p.add_argument("--prefill", action="store_true")
    p.add_argument("--data_type", default="bf16")
    p.add_argument("--mode", nargs="*", default=[])
    p.add_argument("--interpret", action="store_true",
                   help="the GPU's attention path (Pallas kernels per device under shard_map) in interpret mode")
    p.add_argument("--dump", help="write the optimised HLO text here")
    ns = p.parse_args(argv)
    config = shrunk_config(ns.config, ns.layers, ns.mode)
    text = step_hlo(config, ns.tp, ns.rows, ns.data_type, ns.mode, decode=not ns.prefill, interpret=ns.interpret)
    if ns.dump:
        Path(ns.dump).write_text(text)
    json.dump({"device": jax.devices()[0].device_kind, "tp": ns.tp, "rows": ns.rows, "layers": ns.layers,
               "prefill": ns.prefill, "mode": ns.mode, "interpret": ns.interpret,
               **summary(text, config)}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
