"""minilm-jax: all-MiniLM-L6-v2 in JAX/Flax, at parity with sentence-transformers.

    import minilm_jax
    emb = minilm_jax.encode(["A sentence.", "Another one."])   # float32 [2, 384]
    minilm_jax.similarity(emb, emb)                             # cosine matrix [2, 2]

For JAX programs (jit, grad, vmap, your own train step), the functional API:

    model = minilm_jax.load()
    batch = minilm_jax.tokenize(model, ["A sentence.", "Another one."], length=32)  # int32 [2, 32]
    emb = minilm_jax.embed(model.params, batch, model.config)                       # jax.Array [2, 384]
"""

__version__ = "0.2.0"

from minilm_jax.checkpoint_io import Model  # noqa: E402
from minilm_jax.encode import encode, load, similarity  # noqa: E402
from minilm_jax.errors import UserError  # noqa: E402
from minilm_jax.functional import embed, tokenize  # noqa: E402

__all__ = ["Model", "UserError", "embed", "encode", "load", "similarity", "tokenize", "__version__"]
