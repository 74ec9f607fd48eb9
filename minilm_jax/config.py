"""Frozen configuration dataclasses.

`BertConfig` uses the field names of the checkpoint's `config.json`, so reading and writing
it is a dictionary round trip. Only BERT with absolute positions, erf GELU and mean pooling is
supported: anything else is refused by name rather than silently computed differently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from minilm_jax.errors import UserError

_SUPPORTED_ACTIVATIONS = ("gelu",)  # erf GELU, as in transformers' ACT2FN["gelu"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"config.json: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}; fix the config"
            )
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise UserError(
                f"config.json: hidden_act {self.hidden_act!r} is not supported (only erf 'gelu'); "
                "use a BERT checkpoint with hidden_act 'gelu'"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"config.json: {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "BertConfig":
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise UserError(f"{source}: model_type {model_type!r} is not supported; minilm-jax runs BERT models")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UserError(f"{source}: position_embedding_type {position_type!r} is not supported; only 'absolute'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a wrong type in the JSON, e.g. a string where an int belongs
            raise UserError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The transformers-style config.json content (loadable by transformers' BertModel)."""
        out = dataclasses.asdict(self)
        out.update(
            architectures=["BertModel"],
            model_type="bert",
            position_embedding_type="absolute",
            initializer_range=0.02,
            use_cache=True,
        )
        return dict(sorted(out.items()))

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        """A small config for fast tests of the same code paths (real vocab so real tokenizers work)."""
        base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers keeps beside the BERT config: truncation, pooling, normalisation."""

    max_seq_length: int = 256
    do_lower_case: bool = False  # sentence-transformers' flag; the tokenizer's own lower-casing is separate
    pooling: str = "mean"
    normalize: bool = True
