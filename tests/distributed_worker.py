"""One rank of a split model, for tests/test_distributed.py: ``mlx.launch -n N --backend ring
python tests/distributed_worker.py SPEC.json``.

SPEC is ``{"model": DIR, "out": DIR, "dtype": "float32", "bits": null, "prompt": [ids...],
"decode_steps": n}``, and optionally ``"model_on_rank": {"1": DIR}`` (that rank's own path).
DIR may be a float checkpoint (``bits``: quantize each shard at load) or one stored quantized
(``minqwen2 convert --bits``: read in slices). Each rank loads its shard (``distributed.load_distributed``), runs the
prompt (prefill) and ``decode_steps`` cached greedy steps, then writes ``rank<r>.npz``: the
prefill logits ``(T, V)``, the decode logits ``(n, V)``, the greedy tokens chosen from them,
and the tokens of the model's own device-side greedy loop (``greedy_tokens``) from the same
start. Every rank also writes ``rank<r>.json`` (its exit code and error message, if any)
before it exits, so the test sees each rank's outcome even where ``mlx.launch`` stops a rank
(it stops the others when one exits with an error, and exits 0 itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from minqwen2 import distributed


def run(spec: dict, group) -> int:
    path = spec.get("model_on_rank", {}).get(str(group.rank()), spec["model"])  # one rank's own copy
    model, _ = distributed.load_distributed(
        path, group=group, dtype=spec.get("dtype", "float32"), bits=spec.get("bits")
    )
    cache = model.make_cache()
    prefill = np.array(model(np.array(spec["prompt"]), cache))[0]  # (T, V)
    token = int(prefill[-1].argmax())
    tokens, decode = [token], []
    for _ in range(spec["decode_steps"]):
        logits = np.array(model(np.array([token]), cache))[0, -1]  # (V,)
        decode.append(logits)
        token = int(logits.argmax())
        tokens.append(token)
    # The pipelined greedy loop on a fresh cache, from the prompt's first greedy token.
    fresh = model.make_cache()
    model(np.array(spec["prompt"]), fresh, last_only=True)
    device = list(model.greedy_tokens(tokens[0], fresh, spec["decode_steps"]))
    out = Path(spec["out"])
    np.savez(
        out / f"rank{group.rank()}.npz",
        prefill=prefill, decode=np.array(decode), tokens=np.array(tokens), device_tokens=np.array(device),
    )  # fmt: skip
    return 0


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    group = distributed.init()
    code, error = 1, ""
    try:
        code = distributed.on_every_rank(lambda: run(spec, group), group)
        error = "" if code == 0 else "agreed error (printed above)"
    except Exception as err:
        error = str(err)
        raise
    finally:
        status = {"rank": group.rank(), "size": group.size(), "code": code, "error": error}
        (Path(spec["out"]) / f"rank{group.rank()}.json").write_text(json.dumps(status))
    return code


if __name__ == "__main__":
    sys.exit(main())
