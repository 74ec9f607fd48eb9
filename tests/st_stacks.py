"""Sentence-transformers models of every supported module stack, built and saved by
sentence-transformers itself (no hub): a random BERT of a given shape from transformers'
BertModel(BertConfig(...)), a WordPiece tokenizer (all-MiniLM-L6-v2's, or a small one of our own,
cased or uncased), then Pooling, optional Dense modules, optional Normalize, prompts.

`CASES` is the test matrix: a covering design rather than the full product. Every value of every
factor appears at least once, and each pooling value (the six modes and two combinations) has
its own case:
- shapes: "minilm-vocab" (2 layers, width 32, 4 heads, all-MiniLM-L6-v2's uncased vocabulary),
  "small-cased" (1 layer, width 48, 3 heads, a 200-token cased vocabulary, 2 token types,
  max_position_embeddings 40), "deep-narrow" (3 layers, width 24, 2 heads, an uncased small
  vocabulary, max_seq_length 24 so that long texts are truncated);
- pooling: cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken, (cls, mean) in the legacy
  order, (max, cls, weightedmean) in another order (sentence-transformers 6.x's list form);
- Dense: none, one with Tanh, one with GELU, two (ReLU then Identity, the second without bias);
- Normalize: with, without;
- prompts: include_prompt True and False, a default prompt name or none.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

SHAPES = {
    "minilm-vocab": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128, vocab="minilm", max_seq_length=64),
    "small-cased": dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=3, intermediate_size=96,
                        max_position_embeddings=40, vocab="cased", max_seq_length=40),
    "deep-narrow": dict(num_hidden_layers=3, hidden_size=24, num_attention_heads=2, intermediate_size=40,
                        max_position_embeddings=64, vocab="uncased", max_seq_length=24),
}

PROMPTS = {"query": "query: ", "passage": "passage: "}


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    pooling: tuple[str, ...]
    dense: tuple[tuple[str, bool], ...]  # (activation, bias) per Dense module, widths chosen here
    normalize: bool
    include_prompt: bool
    default_prompt_name: str | None = None

    @property
    def id(self) -> str:
        dense = "+".join(a + ("" if b else "-nobias") for a, b in self.dense) or "nodense"
        return (f"{self.shape}-{'+'.join(self.pooling)}-{dense}-{'norm' if self.normalize else 'nonorm'}-"
                f"{'withprompt' if self.include_prompt else 'noprompt'}"
                f"{'-default-' + self.default_prompt_name if self.default_prompt_name else ''}")


CASES = [
    Case("minilm-vocab", ("cls",), (), True, False, "query"),
    Case("small-cased", ("max",), (("Tanh", True),), False, True),
    Case("deep-narrow", ("mean",), (("GELU", True),), True, True),
    Case("minilm-vocab", ("mean_sqrt_len_tokens",), (("GELU", True),), False, False),
    Case("small-cased", ("weightedmean",), (), True, False),
    Case("deep-narrow", ("lasttoken",), (("Tanh", True),), True, False),
    Case("minilm-vocab", ("cls", "mean"), (("ReLU", True), ("Identity", False)), True, True),
    Case("small-cased", ("max", "cls", "weightedmean"), (("ReLU", True), ("Identity", False)), False, False, "passage"),
]

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def small_vocab(texts: list[str], lowercase: bool, size: int = 200) -> dict[str, int]:
    """A WordPiece vocabulary of `size` tokens: the special tokens, every character alone and as a
    ##-continuation, then the commonest words of `texts`."""
    words, chars = {}, set()
    for text in texts:
        text = text.lower() if lowercase else text
        for w in re.findall(r"\w+|[^\w\s]", text):
            words[w] = words.get(w, 0) + 1
            chars.update(w)
    tokens = list(_SPECIAL) + sorted(chars) + [f"##{c}" for c in sorted(chars)]
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= size:
            break
        if w not in tokens:
            tokens.append(w)
    return {t: i for i, t in enumerate(tokens)}


def build_transformer_folder(shape: str, out: Path, texts: list[str], minilm_path: str, seed: int = 0) -> Path:
    """A random transformers BertModel of `shape` and its tokenizer, saved as a plain transformers folder."""
    import torch
    import transformers

    spec = dict(SHAPES[shape])
    vocab_kind = spec.pop("vocab")
    spec.pop("max_seq_length")
    if vocab_kind == "minilm":
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    else:
        lowercase = vocab_kind == "uncased"
        tokenizer = transformers.BertTokenizer(vocab=small_vocab(texts, lowercase), do_lower_case=lowercase)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **spec)
    torch.manual_seed(seed)
    model = transformers.BertModel(config)
    with torch.no_grad():  # BERT's init leaves embeddings nearly alike: spread them so pooling modes differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def build_st_model(case: Case, transformer_folder: Path, seed: int = 0):
    """The SentenceTransformer of `case` around the BertModel in `transformer_folder` (dropout off)."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(transformer_folder), max_seq_length=SHAPES[case.shape]["max_seq_length"])
    width = transformer.get_embedding_dimension()
    modules = [transformer, models.Pooling(width, pooling_mode=case.pooling if len(case.pooling) > 1 else case.pooling[0],
                                           include_prompt=case.include_prompt)]
    torch.manual_seed(seed + 1)
    in_features = width * len(case.pooling)
    for i, (activation, bias) in enumerate(case.dense):
        out_features = 20 if i == 0 else 12
        modules.append(models.Dense(in_features, out_features, bias=bias,
                                    activation_function=getattr(torch.nn, activation)()))
        in_features = out_features
    if case.normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=dict(PROMPTS),
                                default_prompt_name=case.default_prompt_name)
    model.eval()
    return model


def saved_st_model(case: Case, root: Path, texts: list[str], minilm_path: str):
    """(the SentenceTransformer, the folder it saved itself to)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformer = build_transformer_folder(case.shape, root / f"{case.id}-bert", texts, minilm_path)
    model = build_st_model(case, transformer)
    folder = root / case.id
    model.save(str(folder))
    return model, folder
