"""The `splitllm` command line: one subcommand per job, each a thin wrapper over a library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_ARTIFACTS = "artifacts/smollm2"


def cmd_export(a: argparse.Namespace) -> int:
    from splitllm.export.build import export
    from splitllm.export.sources import resolve

    m = export(
        resolve(a.source),
        a.out,
        stages=a.stages,
        context=a.context,
        prefill=a.prefill_len,
        target=a.target,
        accuracy_level=a.accuracy_level,
    )
    for s in m.stages:
        print(
            f"stage {s.index + 1}: layers {s.first_layer}..{s.last_layer - 1}, {s.weight_bytes / 1e6:.1f} MB"
        )
    print(f"wrote {a.out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from splitllm.export.evaluate import perplexity
    from splitllm.services.coordinator.text import TextCodec
    from splitllm.services.stage.chain import LocalChain

    chain = LocalChain(a.artifacts, backend=a.backend)
    codec = TextCodec((Path(a.artifacts) / chain.manifest.tokenizer["file"]).read_text())
    tokens = codec.encode(Path(a.text).read_text())
    p = perplexity(chain, tokens, a.ctx)
    print(
        f"perplexity (second half of each {a.ctx}-token window, llama-perplexity style): {p.second_half:.4f}"
        f"  [{p.scored_second_half} tokens]"
    )
    print(f"perplexity (all tokens): {p.all_tokens:.4f}  [{p.scored_all} tokens, {p.windows} windows]")
    if a.json:
        Path(a.json).write_text(json.dumps(p.__dict__, indent=1))
    return 0


def cmd_stage(a: argparse.Namespace) -> int:
    from splitllm.services.stage.server import run

    run(a.artifacts, a.stage - 1, a.listen, a.backend, a.kv_capacity, a.metrics_port, a.session_ttl, a.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitllm", description="Serve a Llama-class model as a pipeline of gRPC stages."
    )
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint -> artifact directory of split, quantized stage graphs")
    e.add_argument(
        "source", help="'smollm2' (the embedded default), a .gguf file, or a Hugging Face checkpoint dir"
    )
    e.add_argument("--out", required=True, help="artifact directory to write")
    e.add_argument("--stages", type=int, default=4)
    e.add_argument("--context", type=int, default=1024, help="context length C")
    e.add_argument("--prefill-len", type=int, default=128, help="prompt-processing chunk P")
    e.add_argument("--target", default="cpu", choices=["cpu", "qnn"])
    e.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=[0, 1, 2, 3, 4],
        help="MatMulNBits accuracy_level: 4 computes with int8 activations (fast), 0 in float",
    )
    e.set_defaults(run=cmd_export)

    ev = sub.add_parser("eval", help="quality figures of an artifact")
    evs = ev.add_subparsers(dest="metric", required=True)
    pp = evs.add_parser("perplexity", help="perplexity of a text, running the exported graphs")
    pp.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    pp.add_argument("--text", required=True)
    pp.add_argument("--ctx", type=int, default=512)
    pp.add_argument("--backend", default="cpu")
    pp.add_argument("--json", help="also write the figures to this file")
    pp.set_defaults(run=cmd_eval)

    st = sub.add_parser("stage", help="serve one pipeline stage over gRPC")
    st.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    st.add_argument("--stage", type=int, required=True, help="1-based stage index")
    st.add_argument("--listen", required=True, help="address to serve on, e.g. 127.0.0.1:50061")
    st.add_argument("--backend", default="cpu", choices=["cpu", "qnn"])
    st.add_argument("--kv-capacity", type=int, default=16, help="sessions whose KV cache this stage can hold")
    st.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    st.add_argument("--session-ttl", type=float, default=600.0, help="seconds before an idle session is freed")
    st.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: up to 2)")
    st.set_defaults(run=cmd_stage)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # user-facing errors: one line, exit code 2
        print(f"splitllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
