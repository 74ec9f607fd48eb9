"""A tiny BERT with the real all-MiniLM-L6-v2 tokenizer and random weights, written as a model
folder: the same code paths as the real model at a fraction of the compile and step time."""

from __future__ import annotations

import dataclasses

import jax

from minilm_jax import checkpoint_io
from minilm_jax.config import BertConfig, SentenceConfig
from minilm_jax.model import init_params


def tiny_config(**overrides) -> BertConfig:
    return BertConfig.tiny(**overrides)


def write_tiny_model(real_model_dir: str, out: str, kind: str = "sentence-transformers", seed: int = 0,
                     max_seq_length: int = 64, **config_overrides) -> str:
    """Write a tiny random model folder (kind: 'sentence-transformers' or 'minilm-jax') and return its path."""
    real = checkpoint_io.load_model(real_model_dir)
    config = tiny_config(**config_overrides)
    params = jax.device_get(init_params(config, jax.random.PRNGKey(seed)))
    pooler_rng = jax.random.PRNGKey(seed + 1)
    pooler = {"dense": {"kernel": jax.device_get(jax.random.normal(pooler_rng, (config.hidden_size,) * 2) * 0.02),
                        "bias": jax.device_get(jax.numpy.zeros((config.hidden_size,)))}}
    model = real.replace(config=config, params=params, pooler=pooler,
                         sentence=dataclasses.replace(SentenceConfig(), max_seq_length=max_seq_length))
    save = checkpoint_io.save_sentence_transformers if kind == "sentence-transformers" else checkpoint_io.save_minilm_jax
    save(model, out)
    return out
