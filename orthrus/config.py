"""Model configuration: the fields of an HF `config.json` the backbone needs, plus Orthrus' own.

One config covers Qwen3 (QK-norm, explicit head_dim) and the Llama family (SmolLM2, Llama):
`model_type` only decides defaults such as whether attention has QK-norm.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import OrthrusError

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
# The official release's OrthrusConfig extends Qwen3Config under its own model_type.
MODEL_TYPE_ALIASES = {"orthrus": "qwen3"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    model_type: str = "qwen3"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # Orthrus fields (official layout names). mask_token_id >= vocab_size means the vocabulary
    # has no spare row, and the mask is one learned embedding (`model.mask_embedding`).
    block_size: int = 32
    mask_token_id: int | None = None

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def learned_mask(self) -> bool:
        return self.mask_token_id is not None and self.mask_token_id >= self.vocab_size

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        model_type = MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise OrthrusError(
                f"{where}: model_type {model_type!r} is not supported; orthrus runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models (Qwen3, SmolLM2 and other Llama-family)."
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise OrthrusError(f"{where}: rope type {rope_type!r} is not supported (only 'default').")
        try:
            heads = hf["num_attention_heads"]
            eos = hf.get("eos_token_id")
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                attention_bias=hf.get("attention_bias", False),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                block_size=hf.get("block_size") or 32,  # the official config may hold null
                mask_token_id=hf.get("mask_token_id"),
            )
        except KeyError as missing:
            raise OrthrusError(f"{where}: required field {missing} is missing.") from None

    def to_hf(self, architecture: str = "OrthrusLM") -> dict:
        out = asdict(self)
        out["rope_parameters"] = {"rope_theta": out.pop("rope_theta"), "rope_type": "default"}
        out["architectures"] = [architecture]
        return out


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise OrthrusError(f"{folder}: no config.json; expected an HF model folder (config.json + *.safetensors).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OrthrusError(f"{path}: not valid JSON ({e}).") from None
