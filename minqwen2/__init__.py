"""minqwen2: the Qwen2 model family from scratch in NumPy, with an MLX fast path.

    >>> import minqwen2
    >>> model, tokenizer = minqwen2.load()          # the default model, NumPy, float32
    >>> ids = tokenizer.encode("def fib(n):")
    >>> logits = model(ids)                          # (1, T, vocab) float32
    >>> for r in minqwen2.generate(model, tokenizer, "def fib(n):", max_tokens=32):
    ...     print(r.text, end="")

The package imports only NumPy until you call ``load``.
"""

# `minqwen2.generate` is the function; the module of the same name is minqwen2/generate.py
# (import its other names with `from minqwen2.generate import prefill, decode_step`).
from minqwen2.generate import generate
from minqwen2.loader import load, load_model

__version__ = "0.1.0"
__all__ = ["generate", "load", "load_model", "__version__"]
