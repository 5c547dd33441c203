"""One runtime in a process of its own, so that its peak RSS is its own; `splitllm bench` drives it.

    python -m splitllm.bench.runner --runtime {pipeline,chain,llamacpp} --artifacts DIR \
        --gguf FILE [--threads N] [--spin]

Protocol: one JSON command per line on stdin ({"op": "ttft", "tokens": [...]}: a method of the runtime
and its arguments); one JSON line per command on stdout, {"value": ..., "seconds": wall time of the call}
or {"error": "..."}. The first line says {"value": "ready"} once the runtime is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from splitllm.bench.runtimes import RUNTIMES


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", required=True, choices=sorted(RUNTIMES))
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--gguf", default="")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--spin", action="store_true",
                    help="threads spin: llama.cpp at barriers (its stock setting), stages within a step")
    a = ap.parse_args()
    # The protocol keeps the real stdout; anything else printed here or by the pipeline's processes
    # (which inherit fd 1) goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**msg: object) -> None:
        out.write(json.dumps(msg) + "\n")

    try:
        rt = RUNTIMES[a.runtime](artifacts=a.artifacts, gguf=a.gguf, threads=a.threads, spin=a.spin)
    except Exception as e:  # reported to the parent, which says what failed
        reply(error=f"{a.runtime} did not start: {type(e).__name__}: {e}")
        return 1
    reply(value="ready")
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.pop("op")
            if op == "quit":
                break
            t0 = time.perf_counter()
            try:
                value = getattr(rt, op)(**cmd)
            except Exception as e:
                reply(error=f"{a.runtime} {op}: {type(e).__name__}: {e}")
                continue
            reply(value=value, seconds=time.perf_counter() - t0)
    finally:
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
