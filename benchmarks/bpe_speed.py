"""How fast is the from-scratch BPE (``minqwen2/bpe.py``) next to Rust ``tokenizers``?

Encodes about 10 KB of multilingual text (the 29 languages of the Qwen2 report plus code,
from ``tests/tokenizer_corpus.py``) with both, checks that the ids are identical, and
prints the times. A benchmark figure, not a test: timings depend on the machine.

    python benchmarks/bpe_speed.py [MODEL_DIR]     # default: weights/qwen2.5-coder-0.5b-instruct

"bpe.py, cold" starts from an empty piece cache (the text cycles through the corpus about
twice, so pieces seen earlier in the same text are already cache hits: the distinct-piece
count is printed); "warm" encodes the same text again, so every piece is a cache hit and
only the regex split and the lookups remain.
"""

from __future__ import annotations

import sys
import time
import unicodedata
from pathlib import Path

from minqwen2.bpe import BPETokenizer, pretokenize
from minqwen2.paths import REPO_ROOT, default_model_dir
from minqwen2.tokenizer import Tokenizer

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the corpus lives with the tests that use it
from tokenizer_corpus import multilingual_text  # noqa: E402


def best_of(repeats: int, fn) -> float:
    """The fastest of `repeats` runs, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_dir()
    text = multilingual_text(10_240)
    n_bytes = len(text.encode("utf-8"))

    start = time.perf_counter()
    lesson = BPETokenizer.from_file(model_dir / "tokenizer.json")
    load_lesson = time.perf_counter() - start
    start = time.perf_counter()
    fast = Tokenizer.from_dir(model_dir)
    load_fast = time.perf_counter() - start

    ids = fast.encode(text)
    if lesson.encode(text) != ids:
        sys.exit("bpe.py and tokenizers disagree on the benchmark text")

    def cold() -> None:
        lesson._cache.clear()
        lesson.encode(text)

    t_cold = best_of(5, cold)
    t_warm = best_of(5, lambda: lesson.encode(text))
    t_fast = best_of(20, lambda: fast.encode(text))

    pieces = pretokenize(unicodedata.normalize("NFC", text))
    print(f"text: {n_bytes:,} bytes, {len(text):,} characters, {len(ids):,} tokens ({model_dir.name})")
    print(f"pre-tokenized pieces: {len(pieces):,}, of which distinct: {len(set(pieces)):,}")
    print(
        f"load tokenizer.json     bpe.py {load_lesson * 1e3:8.0f} ms   tokenizers {load_fast * 1e3:8.0f} ms"
    )
    rows = [("bpe.py, cold cache", t_cold), ("bpe.py, warm cache", t_warm), ("tokenizers (Rust)", t_fast)]
    for name, seconds in rows:
        print(
            f"{name:22s} {seconds * 1e3:8.2f} ms   {n_bytes / seconds / 1e6:7.2f} MB/s"
            f"   {seconds / t_fast:6.1f}x tokenizers"
        )


if __name__ == "__main__":
    main()
