"""Hugging Face `config.json` → `ModelConfig`: the normalised architecture every family module is built from.

The fields most configs share are read here; each family (`jaxllm/models/<family>.py`) turns its own
config keys into the remaining fields (norm kind, activation, biases, soft-capping, per-layer windows…).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxllm.models.quant import WeightQuant

ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# Each norm layout's per-block norms, by param name (Hugging Face's names in Llama-style checkpoints).
LAYOUT_NORMS = {
    "pre": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "parallel": ("input_layernorm",),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency rescaling, by `kind` ("linear", "dynamic", "llama3", "yarn", "longrope"), with the
    parameters of Hugging Face's `rope_parameters` / `rope_scaling` that the kind reads."""

    kind: str = "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, yarn, longrope, dynamic (the trained length)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn, longrope: cos/sin multiplier (derived from factor if None)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()  # longrope


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer: base `theta`, the first `rotary_dim` dims of each head rotated,
    halves (Llama) or interleaved pairs (GPT-J, Cohere), optional rescaling, optional M-RoPE sections."""

    theta: float = 10000.0
    rotary_dim: int = 0  # 0: the whole head
    interleaved: bool = False
    scaling: RopeScaling | None = None
    # M-RoPE (Qwen2-VL): the frequencies split into sections (counts summing to rotary_dim // 2) that rotate by
    # a token's temporal, height and width positions in turn; () = one position per token.
    mrope_section: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Moe:
    """A mixture-of-experts MLP (`jaxllm/models/moe.py`): `num_experts` gated experts of `intermediate_size`,
    `top_k` per token chosen by softmax router scores; the chosen scores are renormalised to sum to 1
    (`normalize_top_k`) and multiplied by `routed_scale`. Optional shared experts of
    `shared_intermediate_size` that every token passes through, scaled by a sigmoid gate (`shared_gate`,
    Qwen2-MoE) or not (DeepSeek). `layers`: the decoder layers with a MoE MLP (the others keep the dense MLP)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    layers: tuple[int, ...]
    normalize_top_k: bool = True
    routed_scale: float = 1.0
    # Group-limited routing (DeepSeek-V2): experts in `groups` equal groups; a token's top k come from its
    # `top_groups` groups of highest best score. 1 group: plain top-k.
    groups: int = 1
    top_groups: int = 1
    router_float32: bool = False  # the router's product in float32 (DeepSeek keeps its weight in float32)
    shared_intermediate_size: int = 0
    shared_gate: bool = False
    # How `--tp` places the experts (a deployment choice, `parallel.with_expert_placement`): "split" (each
    # expert's intermediate axis across the devices) or "per_device" (num_experts / tp whole experts each).
    placement: str = "split"


@dataclasses.dataclass(frozen=True)
class Mla:
    """Multi-head latent attention (DeepSeek-V2, `jaxllm/models/mla.py`): every head's key and value are
    up-projected from one per-token latent of `kv_rank` dims, beside one rotary key of `rope_dim` dims
    shared by all heads (the KV cache holds these two); queries of `nope_dim + rope_dim` per head come
    straight from the hidden state or through a `q_rank` latent; values have `v_dim` per head."""

    kv_rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    q_rank: int | None = None

    @property
    def cache_dim(self) -> int:
        """Cached values per token and layer."""
        return self.kv_rank + self.rope_dim


@dataclasses.dataclass(frozen=True)
class ScoreHead:
    """A sequence-classification (reward) head in place of the language-model head: `labels` scores per
    sequence, the head's output at its last token that is not `pad_token_id` (transformers' pooling; None:
    the last token); `hf_name` is its tensor's name in the checkpoint ("score" for transformers'
    `*ForSequenceClassification`, "v_head" for InternLM2's reward model)."""

    labels: int
    hf_name: str
    pad_token_id: int | None = None

    def scored_length(self, token_ids: list[int]) -> int:
        """How many leading tokens to run: up to the one pooled (the first when all are padding)."""
        for i in range(len(token_ids) - 1, -1, -1):
            if token_ids[i] != self.pad_token_id:
                return i + 1
        return 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # --- positions: "rope" (with `rope`, or `layer_ropes` per layer), "alibi", or "learned" (absolute table)
    position: str = "rope"
    rope: Rope = Rope()
    layer_ropes: tuple[Rope, ...] = ()  # per-layer rotary (Gemma-3: local and global layers differ); () = `rope`
    # --- norms
    norm: str = "rms"  # "rms" | "layer"
    norm_bias: bool = False  # LayerNorm with a bias
    norm_plus_one: bool = False  # Gemma: the weight is stored as w - 1
    norm_layout: str = "pre"  # "pre" | "sandwich" (also after attn/MLP) | "post" (only after) | "parallel"
    embed_norm: bool = False  # a norm right after the embedding (Bloom)
    qk_norm: str | None = None  # "head" (a norm per head, shared weights) | "all" (over all heads) | None
    qk_norm_per_head_weights: bool = False  # "head" norms with weights [heads, head_dim] (Cohere, StableLM)
    # --- attention
    qkv_bias: bool = False
    o_bias: bool = False
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()  # per-layer sliding window (keys within `window` positions); () = none
    # --- MLP
    mlp_gated: bool = True
    mlp_bias: bool = False
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    # --- scalars of the residual stream and the head
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    final_softcap: float | None = None
    # Positions the model is built for, when its checkpoint changes behaviour past them in a way not built
    # here (Qwen-1's logn attention and dynamic NTK past `seq_length`); None: no such limit.
    max_context: int | None = None
    # How the matmul weights are stored (jaxllm/models/quant.py); None: in the model's 16-bit dtype.
    weight_quant: "WeightQuant | None" = None
    # --- mixture of experts (None: every layer has the dense MLP)
    moe: Moe | None = None
    # --- multi-head latent attention (None: attention over per-head keys and values)
    mla: Mla | None = None
    # --- a score head instead of the LM head (reward models, from config.json's `architectures`)
    score_head: ScoreHead | None = None
    # --- a vision tower feeding image embeddings (`jaxllm/models/vision/interface.py: VisionConfig`); None: text only
    vision: Any = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def check_context(self, max_total_len: int) -> None:
        """ValueError when requests of `max_total_len` tokens (--max_req_total_len) pass `max_context`."""
        if self.max_context is not None and max_total_len > self.max_context:
            raise ValueError(
                f"--max_req_total_len {max_total_len} passes the {self.max_context} positions jaxllm serves "
                f"{self.model_type} models for (what the checkpoint does past them is not built)"
            )

    def layer_rope(self, layer: int) -> Rope:
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    def layer_window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    @property
    def kv_values_per_token(self) -> int:
        """Values the KV cache holds per token, all layers (keys and values, or the latent and rotary key)."""
        per_layer = self.mla.cache_dim if self.mla is not None else 2 * self.num_kv_heads * self.head_dim
        return self.num_layers * per_layer

    @property
    def per_head_kv_values_per_token(self) -> int:
        """Values a cache of every KV head's keys and values would hold per token, all layers: the cache itself,
        except with latent attention, whose heads' keys (nope + rope dims) and values the latent replaces."""
        if self.mla is None:
            return self.kv_values_per_token
        return self.num_layers * self.num_heads * (self.mla.nope_dim + self.mla.rope_dim + self.mla.v_dim)

    @property
    def num_params(self) -> int:
        return self._count_params(active=False)

    @property
    def num_active_params(self) -> int:
        """The params one token reads: every weight but the experts it is not routed to."""
        return self._count_params(active=True)

    def _count_params(self, active: bool) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        if self.mla is not None:
            attn = self._mla_params()
        mlp = (3 if self.mlp_gated else 2) * d * f + ((2 * f if self.mlp_gated else f) + d if self.mlp_bias else 0)
        norm = d * (2 if self.norm_bias else 1)
        qk_norms = {None: 0, "all": q + kv, "head": (q + kv) if self.qk_norm_per_head_weights else 2 * self.head_dim}
        block = attn + len(LAYOUT_NORMS[self.norm_layout]) * norm + qk_norms[self.qk_norm]
        layers = sum(block + (self._moe_params(active) if self.is_moe_layer(i) else mlp) for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else v * d
        if self.score_head is not None:
            head = self.score_head.labels * d
        positions = self.max_position_embeddings * d if self.position == "learned" else 0
        return v * d + positions + (norm if self.embed_norm else 0) + layers + norm + head

    def _mla_params(self) -> int:
        a, d, h = self.mla, self.hidden_size, self.num_heads
        qk = h * (a.nope_dim + a.rope_dim)
        q = d * qk if a.q_rank is None else d * a.q_rank + a.q_rank + a.q_rank * qk
        return q + d * a.cache_dim + a.kv_rank + a.kv_rank * h * (a.nope_dim + a.v_dim) + h * a.v_dim * d

    def _moe_params(self, active: bool) -> int:
        m, d = self.moe, self.hidden_size
        experts = m.top_k if active else m.num_experts
        shared = 3 * d * m.shared_intermediate_size + (d if m.shared_gate else 0)
        return d * m.num_experts + experts * 3 * d * m.intermediate_size + shared

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """The family of `raw["model_type"]` normalises its config; ValueError lists the supported types."""
        # Imported here: the family modules import this one.
        from jaxllm.models.quant import checkpoint_quant
        from jaxllm.models.registry import config_from_hf

        return dataclasses.replace(config_from_hf(raw), weight_quant=checkpoint_quant(raw))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, trust_remote_code: bool = False) -> "ModelConfig":
        """The config of `model_dir`. A config that names its own Python code (`auto_map`) is refused unless
        `trust_remote_code` (LightLLM's flag) allows it; even then no code of the checkpoint runs here: the
        family module reads the config's fields."""
        raw = read_hf_config(model_dir)
        if "auto_map" in raw and not trust_remote_code:
            raise ValueError(
                f"{model_dir} ships its own model code (config.json has 'auto_map'); "
                "pass --trust_remote_code to load it"
            )
        return cls.from_hf_dict(raw)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return json.loads(path.read_text())


def common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields read the same way in most families (Llama's key names)."""
    num_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // num_heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return dict(
        model_type=raw.get("model_type", "llama"),
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        rope=rope_from_hf(raw, head_dim),
        qkv_bias=bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        activation=activation_from_hf(raw.get("hidden_act") or raw.get("hidden_activation") or "silu"),
        layer_windows=layer_windows_from_hf(raw, raw["num_hidden_layers"]),
    )


_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "gelu": "gelu", "quick_gelu": "quick_gelu"}


def activation_from_hf(name: str) -> str:
    """A Hugging Face activation name → ours ("silu", "gelu_tanh", "gelu")."""
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported ({', '.join(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[name]


def layer_windows_from_hf(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows: from `layer_types` where the config lists them (Gemma-2/3, Qwen), else
    `sliding_window` on every layer (Mistral, Phi-3, StarCoder-2); () when no layer has one."""
    window = raw.get("sliding_window")
    if not window:
        return ()
    types = raw.get("layer_types")
    if types is None:
        return (int(window),) * num_layers
    windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
    return windows if any(windows) else ()


def rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 folds rope_theta and rope_scaling into "rope_parameters".
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def rope_from_hf(raw: dict[str, Any], head_dim: int, params: dict[str, Any] | None = None,
                 interleaved: bool = False) -> Rope:
    """The `Rope` of a config (or of one of its per-layer-type `params` dicts)."""
    params = rope_params(raw) if params is None else params
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    return Rope(
        theta=float(theta), rotary_dim=int(head_dim * partial), interleaved=interleaved,
        scaling=rope_scaling_from_hf(raw, params),
    )


def rope_scaling_from_hf(raw: dict[str, Any], params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_KINDS:
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_KINDS[1:])})")
    original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if kind == "dynamic":
        original = raw.get("max_position_embeddings", 4096)
    original = int(original or raw.get("max_position_embeddings", 4096))
    factor = params.get("factor")
    if factor is None:
        factor = raw.get("max_position_embeddings", original) / original
    return RopeScaling(
        kind=kind,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=tuple(params.get("short_factor") or ()),
        long_factor=tuple(params.get("long_factor") or ()),
    )
