"""Frozen configuration dataclasses.

`BertConfig` uses the field names of the checkpoint's `config.json`, so reading and writing
it is a dictionary round trip. Any BERT size and vocabulary with absolute positions and erf GELU
is supported; another architecture is refused by its `model_type` rather than silently computed
differently.

`SentenceConfig` is the rest of a sentence-transformers model: truncation, the modules after the
Transformer (Pooling, Dense, Normalize: `Head`), prompts and the similarity function.
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
            raise UserError(f"{source}: model_type {model_type!r} is not supported; minilm-jax runs BERT models "
                            "(model_type 'bert': MiniLM, BGE, E5, paraphrase-MiniLM, any BERT size or vocabulary), "
                            "not MPNet, XLM-RoBERTa, ModernBERT or other architectures")
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


# sentence-transformers' Pooling modes (its Pooling.POOLING_MODES, in its legacy concatenation order).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Dense activations by the class name torch writes (ST saves `fullname(activation)`): each is a
# torch.nn module with its default arguments, computed by the jax function of the same maths.
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "LeakyReLU", "ELU", "Softplus",
                     "Softsign", "Mish", "Hardtanh", "ReLU6", "SELU", "CELU", "Tanhshrink")
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """One sentence-transformers Dense module: activation(x @ W + b)."""

    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "Tanh"  # a name of DENSE_ACTIVATIONS

    def __post_init__(self):
        if self.activation not in DENSE_ACTIVATIONS:
            raise UserError(f"Dense activation {self.activation!r} is not supported; minilm-jax computes the torch "
                            f"activations {', '.join(DENSE_ACTIVATIONS)} (with their default arguments)")
        for name in ("in_features", "out_features"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) <= 0:
                raise UserError(f"Dense {name} must be a positive integer, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Head:
    """The modules after the Transformer, which decide the embedding program: Pooling's modes
    (concatenated in this order), then the Dense modules in order, then Normalize or not. Hashable:
    a jit cache key."""

    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[DenseConfig, ...] = ()
    normalize: bool = True

    def __post_init__(self):
        if not self.pooling:
            raise UserError("Pooling needs at least one pooling mode")
        for mode in self.pooling:
            if mode not in POOLING_MODES:
                raise UserError(f"pooling mode {mode!r} is not supported; use one of {', '.join(POOLING_MODES)}")

    def describe(self) -> str:
        """e.g. "cls pooling, Dense 384->256 Tanh, Normalize"."""
        parts = [f"{'+'.join(self.pooling)} pooling"]
        parts += [f"Dense {d.in_features}->{d.out_features} {d.activation}" for d in self.dense]
        return ", ".join(parts + (["Normalize"] if self.normalize else []))

    def pooled_dimension(self, hidden_size: int) -> int:
        return len(self.pooling) * hidden_size

    def dimension(self, hidden_size: int) -> int:
        """The embedding's dimension: the last Dense's out_features, else the pooled dimension."""
        return self.dense[-1].out_features if self.dense else self.pooled_dimension(hidden_size)

    def check(self, hidden_size: int, source: str = "modules.json") -> None:
        """Each module's input dimension is its predecessor's output dimension."""
        width = self.pooled_dimension(hidden_size)
        for i, dense in enumerate(self.dense):
            if dense.in_features != width:
                raise UserError(f"{source}: Dense module {i} has in_features {dense.in_features} but its input has "
                                f"{width} dimensions; fix the Dense config or the module order")
            width = dense.out_features


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers keeps beside the BERT config: truncation, the module stack after the
    Transformer, prompts (config_sentence_transformers.json) and the similarity function."""

    max_seq_length: int = 256
    do_lower_case: bool = False  # sentence-transformers' flag; the tokenizer's own lower-casing is separate
    pooling: tuple[str, ...] = ("mean",)
    normalize: bool = True
    dense: tuple[DenseConfig, ...] = ()
    include_prompt: bool = True  # Pooling's: False leaves the prompt's tokens out of the pooled ones
    prompts: tuple[tuple[str, str], ...] = ()  # (name, prompt text) in the file's order
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"

    def __post_init__(self):
        if isinstance(self.pooling, str):  # minilm-jax folders of version 1 wrote "mean"
            object.__setattr__(self, "pooling", (self.pooling,))
        object.__setattr__(self, "pooling", tuple(self.pooling))
        object.__setattr__(self, "dense", tuple(d if isinstance(d, DenseConfig) else DenseConfig(**d)
                                                for d in self.dense))
        prompts = dict(self.prompts)
        object.__setattr__(self, "prompts", tuple((str(k), str(v)) for k, v in prompts.items()))
        Head(self.pooling, self.dense, self.normalize)  # validates the modes
        if self.default_prompt_name is not None and self.default_prompt_name not in prompts:
            raise UserError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                            f"({', '.join(prompts) or 'none'}); fix config_sentence_transformers.json")
        if self.similarity_fn_name not in SIMILARITY_FNS:
            raise UserError(f"similarity_fn_name {self.similarity_fn_name!r} is not supported; use one of "
                            f"{', '.join(SIMILARITY_FNS)}")

    @property
    def head(self) -> Head:
        return Head(self.pooling, self.dense, self.normalize)

    @property
    def prompt_dict(self) -> dict[str, str]:
        return dict(self.prompts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (minilm_jax.json): lists for tuples, prompts as an object."""
        out = dataclasses.asdict(self)
        out["pooling"] = list(self.pooling)
        out["dense"] = [dataclasses.asdict(d) for d in self.dense]
        out["prompts"] = self.prompt_dict
        return out
