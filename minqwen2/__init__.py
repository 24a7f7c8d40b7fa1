"""minqwen2: the Qwen2 model family from scratch in NumPy, with an MLX fast path."""

__version__ = "0.1.0"
