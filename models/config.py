"""Llama 4 text-model configuration: every field of transformers' Llama4TextConfig that changes
inference, read from a checkpoint's config.json (the named presets: moec.models.presets).

Both checkpoint flavours are accepted: ``Llama4ForCausalLM`` (the text config is the file itself)
and ``Llama4ForConditionalGeneration`` (the text config is its ``text_config``). Older config.json
files spell RoPE as ``rope_theta`` + ``rope_scaling``; transformers 5 writes ``rope_parameters``.
Both are read into one ``RopeParameters``.

Derived per-layer facts (which layers are MoE, which use RoPE, which use chunked attention) are
resolved here once, with transformers' rules, so the model, the exporter and the passes read the
same answer.
"""

from __future__ import annotations


import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moec.common.errors import BAD_JSON, MoecError
from moec.models.config_bounds import check_config_bounds, check_layer_count


CAUSAL_LM = "Llama4ForCausalLM"


CONDITIONAL_GENERATION = "Llama4ForConditionalGeneration"


SUPPORTED_ARCHITECTURES = (CAUSAL_LM, CONDITIONAL_GENERATION)


TEXT_MODEL_TYPE = "llama4_text"


MULTIMODAL_MODEL_TYPE = "llama4"


CHUNKED_ATTENTION = "chunked_attention"


FULL_ATTENTION = "full_attention"


# Defaults of transformers' Llama4TextConfig, used when a config.json leaves a field out (so a
# file that relies on them means what it means to transformers).
_HF_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "attention_bias": False,
    "rope_theta": 500000.0,
}


# Shape-defining fields: a config.json without them is not a Llama 4 text config we can trust.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
)


@dataclass(frozen=True)
class RopeParameters:
    """RoPE frequencies: plain (``default``) or Llama 3.1 scaled (``llama3``)."""

    rope_type: str = "default"  # "default" | "llama3"
    rope_theta: float = 500000.0
    # llama3 only:
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Llama4Config:
    """The Llama 4 text model. Field names follow transformers' Llama4TextConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] = ()
    interleave_moe_layer_step: int = 1  # what moe_layers was derived from (kept for replace())
    no_rope_layer_interval: int = 4  # what no_rope_layers was derived from
    # 1 = the layer uses RoPE, 0 = NoPE (transformers' name, inverted meaning kept on purpose).
    no_rope_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_parameters: RopeParameters = field(default_factory=RopeParameters)
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    # -- derived facts ------------------------------------------------------------------------
    def moe_layer_indices(self) -> tuple[int, ...]:
        return self.moe_layers

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def uses_chunked_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == CHUNKED_ATTENTION

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (the one a tokenizer appends)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> Llama4Config:
        try:
            return PRESETS[name]
        except KeyError:
            raise MoecError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Llama4Config:
        """Read ``config.json`` from a checkpoint directory (or a .json config file itself)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".json":
            file = path
        else:
            # Anything else must be a checkpoint folder; one check, one message, for every command.
            from moec.models.checkpoint import CONFIG_FILE, checkpoint_folder

            file = checkpoint_folder(path) / CONFIG_FILE
        try:
            d = json.loads(file.read_text())
        except BAD_JSON as e:
            raise MoecError(f"{file}: not valid JSON ({e})") from None
        except OSError as e:
            raise MoecError(f"{file}: cannot read it ({e.strerror or e}); check its permissions") from None
        return cls.from_hf_dict(d, source=str(file))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Llama4Config:
        """Build from a transformers config dict (Llama4ForCausalLM, Llama4ForConditionalGeneration,
        or a bare llama4_text config such as ``to_dict()`` writes)."""
        if not isinstance(d, dict):
            raise MoecError(f"{source}: expected a JSON object, got {type(d).__name__}")
        text = _select_text_config(d, source)
        return _parse_text_config(text, source)

    def replace(self, **changes: Any) -> Llama4Config:
        """A copy with some fields changed, re-validated (derived layer lists are re-derived
        unless given)."""
        d = self.to_dict()
        if "num_hidden_layers" in changes:
            for key in ("moe_layers", "no_rope_layers", "layer_types"):
                d.pop(key, None)
        for k, v in changes.items():
            if k == "rope_parameters" and isinstance(v, RopeParameters):
                v = v.to_dict()
            if k == "eos_token_ids":
                k, v = "eos_token_id", list(v)
            d[k] = v
        return Llama4Config.from_hf_dict(d, source="Llama4Config.replace")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A transformers-style llama4_text config dict; ``from_hf_dict`` reads it back."""
        d: dict[str, Any] = {"model_type": TEXT_MODEL_TYPE}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "rope_parameters":
                v = v.to_dict()
            elif f.name == "eos_token_ids":
                d["eos_token_id"] = v[0] if len(v) == 1 else list(v)
                continue
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    def to_hf_config(self, architecture: str = CAUSAL_LM, dtype: str = "float32") -> dict[str, Any]:
        """config.json content for a checkpoint of ``architecture`` whose weights are ``dtype``
        (transformers' name), loadable by transformers."""
        text = self.to_dict()
        if architecture == CAUSAL_LM:
            return {"architectures": [CAUSAL_LM], **text, "dtype": dtype}
        if architecture == CONDITIONAL_GENERATION:
            return {
                "architectures": [CONDITIONAL_GENERATION],
                "model_type": MULTIMODAL_MODEL_TYPE,
                "text_config": text,
                "tie_word_embeddings": False,
                "dtype": dtype,
            }
        raise MoecError(f"unknown architecture {architecture!r}; choose one of: {', '.join(SUPPORTED_ARCHITECTURES)}")


def architecture_of(d: dict[str, Any], source: str = "config.json") -> str:
    """Which supported architecture a config.json describes (CAUSAL_LM or CONDITIONAL_GENERATION)."""
    archs = d.get("architectures")
    model_type = d.get("model_type")
    if archs:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise MoecError(f"{source}: 'architectures' must be a list of names, got {archs!r}")
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise MoecError(
                f"{source}: unsupported architecture {', '.join(archs)}; moec supports "
                f"{' and '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return known[0]
    if model_type == TEXT_MODEL_TYPE:
        return CAUSAL_LM
    if model_type == MULTIMODAL_MODEL_TYPE:
        return CONDITIONAL_GENERATION
    raise MoecError(
        f"{source}: cannot tell the model type (no 'architectures', model_type={model_type!r}); "
        f"moec supports {' and '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _select_text_config(d: dict[str, Any], source: str) -> dict[str, Any]:
    if architecture_of(d, source) == CAUSAL_LM:
        return d
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise MoecError(f"{source}: a {CONDITIONAL_GENERATION} config needs a 'text_config' object")
    return text


def _int(d: dict, key: str, source: str, *, minimum: int = 1, default: Any = ...) -> int:
    v = d.get(key, _HF_DEFAULTS.get(key, default) if default is ... else default)
    if v is ... or v is None:
        raise MoecError(f"{source}: missing field '{key}'")
    if isinstance(v, bool) or not isinstance(v, int):
        # JSON writers sometimes emit 8.0 for an integer field.
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise MoecError(f"{source}: field '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise MoecError(f"{source}: field '{key}' must be >= {minimum}, got {v}")
    return v


def _float(d: dict, key: str, source: str, default: Any = ...) -> float:
    v = d.get(key, _HF_DEFAULTS.get(key) if default is ... else default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MoecError(f"{source}: field '{key}' must be a finite number, got {v!r}")
    return float(v)


def _bool(d: dict, key: str, source: str) -> bool:
    v = d.get(key, _HF_DEFAULTS[key])
    # Meta's released configs write attn_temperature_tuning as 4; transformers only tests truth.
    if isinstance(v, (bool, int)):
        return bool(v)
    raise MoecError(f"{source}: field '{key}' must be true or false, got {v!r}")


def _optional_token(d: dict, key: str, source: str, vocab: int) -> int | None:
    v = d.get(key, _HF_DEFAULTS[key])
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
        raise MoecError(f"{source}: field '{key}' must be a token id in [0, {vocab}), got {v!r}")
    return v


def _parse_rope(d: dict, source: str) -> RopeParameters:
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling")
        params = dict(params) if isinstance(params, dict) else {}
        params.setdefault("rope_theta", d.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    if not isinstance(params, dict):
        raise MoecError(f"{source}: field 'rope_parameters' must be an object, got {params!r}")
    where = f"{source} (rope_parameters)"
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _float(params, "rope_theta", where, default=d.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    if theta <= 0:
        raise MoecError(f"{where}: 'rope_theta' must be positive, got {theta}")
    if rope_type == "default":
        return RopeParameters("default", theta)
    if rope_type == "llama3":
        orig = params.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        factors = {k: _float(params, k, where, default=None) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        for k, v in factors.items():
            if v <= 0:
                raise MoecError(f"{where}: '{k}' must be positive, got {v}")
        return RopeParameters(
            "llama3",
            theta,
            **factors,
            original_max_position_embeddings=_int(
                {"original_max_position_embeddings": orig}, "original_max_position_embeddings", where
            ),
        )
    raise MoecError(f"{where}: unsupported rope_type {rope_type!r}; moec supports 'default' and 'llama3'")


def _int_list(d: dict, key: str, source: str) -> list[int] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise MoecError(f"{source}: field '{key}' must be a list of integers, got {v!r}")
    return v


def _parse_text_config(d: dict[str, Any], source: str) -> Llama4Config:
    for key in _REQUIRED:
        if key not in d:
            raise MoecError(f"{source}: missing field '{key}'")
    vocab = _int(d, "vocab_size", source)
    hidden = _int(d, "hidden_size", source)
    layers = _int(d, "num_hidden_layers", source)
    check_layer_count(layers, source)  # before any per-layer list is built
    heads = _int(d, "num_attention_heads", source)
    # transformers: an absent field takes the class default, an explicit null a derived value.
    kv_raw = d.get("num_key_value_heads", _HF_DEFAULTS["num_key_value_heads"])
    kv_heads = _int({"num_key_value_heads": heads if kv_raw is None else kv_raw}, "num_key_value_heads", source)
    hd_raw = d.get("head_dim", _HF_DEFAULTS["head_dim"])
    head_dim = _int({"head_dim": hidden // heads if hd_raw is None else hd_raw}, "head_dim", source)
    if heads % kv_heads:
        raise MoecError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    if head_dim % 2:
        raise MoecError(f"{source}: head_dim must be even for RoPE, got {head_dim}")
    experts = _int(d, "num_local_experts", source)
    top_k = _int(d, "num_experts_per_tok", source)
    if top_k > experts:
        raise MoecError(f"{source}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")

    step = _int(d, "interleave_moe_layer_step", source)
    interval = _int(d, "no_rope_layer_interval", source)
    moe_layers = _int_list(d, "moe_layers", source)
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step))
    bad = [i for i in moe_layers if not 0 <= i < layers]
    if bad or len(set(moe_layers)) != len(moe_layers):
        raise MoecError(f"{source}: moe_layers {moe_layers} must be distinct layer indices in [0, {layers})")

    no_rope = _int_list(d, "no_rope_layers", source)
    if not no_rope:  # transformers treats [] like null
        no_rope = [int((i + 1) % interval != 0) for i in range(layers)]
    if len(no_rope) < layers or any(x not in (0, 1) for x in no_rope):
        raise MoecError(
            f"{source}: no_rope_layers must hold at least {layers} entries of 0 (NoPE) or 1 (RoPE), got {no_rope}"
        )
    no_rope = no_rope[:layers]

    chunk = d.get("attention_chunk_size", _HF_DEFAULTS["attention_chunk_size"])
    if chunk is not None:
        chunk = _int(d, "attention_chunk_size", source)
    layer_types = d.get("layer_types")
    if layer_types is None:
        layer_types = [CHUNKED_ATTENTION if r and chunk is not None else FULL_ATTENTION for r in no_rope]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != layers
        or any(t not in (CHUNKED_ATTENTION, FULL_ATTENTION) for t in layer_types)
    ):
        raise MoecError(
            f"{source}: layer_types must list {layers} entries of '{CHUNKED_ATTENTION}' or '{FULL_ATTENTION}', "
            f"got {layer_types!r}"
        )
    if chunk is None and CHUNKED_ATTENTION in layer_types:
        raise MoecError(f"{source}: layer_types asks for chunked attention but attention_chunk_size is null")

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise MoecError(f"{source}: hidden_act {act!r} is not supported; Llama 4 uses 'silu'")

    eos = d.get("eos_token_id", _HF_DEFAULTS["eos_token_id"])
    eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab for e in eos_list):
        raise MoecError(f"{source}: eos_token_id must be token ids in [0, {vocab}), got {eos!r}")

    rms_eps = _float(d, "rms_norm_eps", source)
    if rms_eps <= 0:
        raise MoecError(f"{source}: rms_norm_eps must be positive, got {rms_eps}")

    config = Llama4Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(d, "intermediate_size", source),
        intermediate_size_mlp=_int(d, "intermediate_size_mlp", source),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        moe_layers=tuple(sorted(moe_layers)),
        interleave_moe_layer_step=step,
        no_rope_layer_interval=interval,
        no_rope_layers=tuple(no_rope),
        layer_types=tuple(layer_types),
        attention_chunk_size=chunk,
        use_qk_norm=_bool(d, "use_qk_norm", source),
        attn_temperature_tuning=_bool(d, "attn_temperature_tuning", source),
        floor_scale=_int(d, "floor_scale", source),
        attn_scale=_float(d, "attn_scale", source),
        attention_bias=_bool(d, "attention_bias", source),
        rms_norm_eps=rms_eps,
        rope_parameters=_parse_rope(d, source),
        max_position_embeddings=_int(d, "max_position_embeddings", source),
        tie_word_embeddings=_bool(d, "tie_word_embeddings", source),
        bos_token_id=_optional_token(d, "bos_token_id", source, vocab),
        eos_token_ids=tuple(eos_list),
        pad_token_id=_optional_token(d, "pad_token_id", source, vocab),
        hidden_act=act,
    )
    check_config_bounds(config, source)
    return config


# Presets are built by this module's parser, so they are imported once Llama4Config exists.
from moec.models.presets import PRESET_SOURCES, PRESETS, TINY_VOCAB_SIZE  # noqa: E402, F401
