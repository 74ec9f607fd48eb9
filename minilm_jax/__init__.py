"""minilm-jax: all-MiniLM-L6-v2 in JAX/Flax, at parity with sentence-transformers.

    import minilm_jax
    emb = minilm_jax.encode(["A sentence.", "Another one."])   # float32 [2, 384]
    minilm_jax.similarity(emb, emb)                             # cosine matrix [2, 2]

For JAX programs (jit, grad, vmap, your own train step), the functional API:

    model = minilm_jax.load()
    batch = minilm_jax.tokenize(model, ["A sentence.", "Another one."], length=32)  # int32 [2, 32]
    emb = minilm_jax.embed(model.params, batch, model.config)                       # jax.Array [2, 384]

Search on the devices, as sentence_transformers.util does (embed_corpus.py and search.py for corpora on disk):

    hits = minilm_jax.semantic_search(query_emb, corpus_emb, top_k=10)    # [[{"corpus_id", "score"}, ...], ...]
    pairs = minilm_jax.paraphrase_mining_embeddings(emb, top_k=100)        # [[score, i, j], ...]
    packed = minilm_jax.quantize_embeddings(emb, "ubinary")                # quantize_embeddings, bit for bit
"""

__version__ = "0.2.0"

from minilm_jax.checkpoint_io import Model  # noqa: E402
from minilm_jax.encode import encode, load, similarity  # noqa: E402
from minilm_jax.errors import UserError  # noqa: E402
from minilm_jax.functional import embed, tokenize  # noqa: E402
from minilm_jax.quantize import quantize_embeddings  # noqa: E402
from minilm_jax.search import (paraphrase_mining, paraphrase_mining_embeddings, place_corpus,  # noqa: E402
                               semantic_search)

__all__ = ["Model", "UserError", "embed", "encode", "load", "paraphrase_mining", "paraphrase_mining_embeddings",
           "place_corpus", "quantize_embeddings", "semantic_search", "similarity", "tokenize", "__version__"]
