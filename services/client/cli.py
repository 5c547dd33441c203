"""The `splitllm` command line: one subcommand per job, each a thin wrapper over a library call."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_ARTIFACTS = "artifacts/smollm2"
SPIN_HELP = ("idle intra-op threads spin up to 50 us before they sleep, within a step only: with --threads 2, lower "
             "latency for fewer concurrent tokens/s (on an AVX-512 host, against 1 sleeping thread: TTFT ~0.65x, "
             "decode ~0.8x, 16 streams ~0.8x)")


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
        calibration=a.calibration,
        qnn_context=a.qnn_context,
        qnn_w8=tuple(x for x in (a.qnn_w8 or "").split(",") if x),
        balance=a.balance,
        kernels=a.kernels,
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
    codec = TextCodec.from_file(Path(a.artifacts) / chain.manifest.tokenizer["file"])
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


def cpu_list(text: str) -> tuple[int, ...]:
    """--cpus: comma-separated CPU ids that this process may run on."""
    from splitllm.services.stage.runtime import check_cpus

    try:
        cpus = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CPU ids") from None
    try:
        check_cpus(cpus)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return cpus


def cmd_stage(a: argparse.Namespace) -> int:
    import asyncio

    from splitllm.services.client.launcher import follow_parent
    from splitllm.services.stage.server import stage_process

    follow_parent()
    main = stage_process(a.artifacts, a.stage - 1, a.listen, a.backend, a.kv_capacity, a.metrics_port, a.session_ttl,
                         a.threads, allow_cpu_fallback=a.allow_cpu_fallback, spin=a.spin, cpus=a.cpus)
    if a.event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
    return 0


def cmd_coordinator(a: argparse.Namespace) -> int:
    from splitllm.services.client.launcher import follow_parent
    from splitllm.services.coordinator.server import run

    follow_parent()
    stages = [x.strip() for x in a.stages.split(",") if x.strip()]
    run(a.artifacts, stages, a.listen, a.metrics_port, a.max_concurrent, a.truncate_to_context, a.wait_stages,
        a.prompt_chunks == "spread", a.batches_in_flight, a.prompt_window, a.draft_tokens)
    return 0


SAMPLE_PROMPTS = ["where is California?", "what is 2+3?", "what is superposition in Quantum Physics?"]


def print_summary(prompt: str, response: str) -> None:
    print("-------- Response Summary --------")
    print(f"Prompt: {prompt}")
    print(f"Response: {response}")


def generate(client: object, a: argparse.Namespace, prompt: str) -> None:
    kwargs = dict(prompt=prompt, system=a.system or "", max_tokens=a.max_output_tokens, temperature=a.temperature,
                  top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    if a.stream:
        parts = []
        for msg in client.stream(**kwargs):  # type: ignore[attr-defined]
            parts.append(msg.text)
            print(msg.text, end="", flush=True)
            if msg.finish_reason:
                u = msg.usage
                print(f"\n[{u.completion_tokens} tokens, TTFT {u.ttft_seconds * 1e3:.0f} ms, "
                      f"{u.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
        print_summary(prompt, "".join(parts))
    else:
        print_summary(prompt, client.generate(**kwargs).text)  # type: ignore[attr-defined]


def cmd_generate(a: argparse.Namespace) -> int:
    import grpc

    from splitllm.services.client.client import Client

    try:
        with Client(a.coordinator) as c:
            generate(c, a, a.prompt)
    except grpc.RpcError as e:
        print(f"splitllm generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from splitllm.services.client.launcher import serve

    return serve(a.artifacts, kv_capacity=a.kv_capacity, backend=a.backend, stage_threads=a.stage_threads,
                 stage_spin=a.spin, stage_pin=a.pin,
                 extra_coordinator_args=[] if a.draft_tokens is None else ["--draft-tokens", str(a.draft_tokens)])


def cmd_demo(a: argparse.Namespace) -> int:
    from splitllm.services.client.client import Client
    from splitllm.services.client.launcher import Pipeline, describe, ensure_artifacts

    ensure_artifacts(a.artifacts)
    with Pipeline(a.artifacts, backend=a.backend) as p:
        print(describe(p), flush=True)
        with Client(p.coordinator.address) as c:
            for prompt in SAMPLE_PROMPTS:
                generate(c, a, prompt)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from splitllm.bench.suite import run

    try:
        runtimes = tuple(a.runtimes.split(",")) if a.runtimes else None
        return run(a.artifacts, quick=a.quick, reps=a.reps, gguf=a.gguf or "", runtimes=runtimes,
                   llamacpp_threads=a.llamacpp_threads, spin=a.spin, out_dir=a.out)
    except RuntimeError as e:  # a runtime failed: its message says which and where its log is
        print(f"splitllm bench: {e}", file=sys.stderr)
        return 1


def cmd_hub(a: argparse.Namespace) -> int:
    from splitllm.services.client import hub

    stages = [int(x) for x in a.stages.split(",")] if a.stages else None
    getattr(hub, a.action)(a.artifacts, a.device, stages=stages)
    return 0


def add_draft_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-tokens", type=int,
                   help="speculative decoding: guesses (from earlier text, prompt lookup) a request's token step "
                   "feeds after its token while it is the only request generating; the tokens (and a seed's draws) "
                   "are the same, in fewer steps where text repeats (0 = off; default 3, engine.DRAFT_TOKENS)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-output-tokens", type=int, default=30)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")


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
    e.add_argument("--balance", choices=["compute", "bytes"],
                   help="split the layers evenly (compute: the default for cpu, faster prompts on few cores) or "
                        "by weight bytes (the default for qnn: NPU memory per graph)")
    e.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=[0, 1, 2, 3, 4],
        help="MatMulNBits accuracy_level: 4 computes with int8 activations (fast; GGUF Q4_1 layers then run as our "
             "MatMulQ4_1), 0 in float (exact, and a session's "
             "results do not depend on its batch; slow: ONNX Runtime 1.31 has no fast float kernel for 8-bit weights, "
             "SmolLM2's lm_head takes 167 ms a token instead of 1.5 ms on one AVX2 core)",
    )
    e.add_argument("--kernels", default="splitllm", choices=["splitllm", "onnxruntime"],
                   help="who runs GGUF Q4_1 and Q8_0 weights on the CPU at accuracy level 4: our MatMulQ4_1 / "
                        "MatMulQ8_0 (AVX2; portable C elsewhere, ~20x slower) or ONNX Runtime's MatMulNBits (its "
                        "kernels for every CPU, NEON included; on AVX2 ~30 %% slower a token)")
    e.add_argument("--calibration", help="qnn: text whose activations set the 16-bit ranges (default: shipped)")
    e.add_argument("--qnn-context", action="store_true",
                   help="qnn: also write EPContext models (QNN context binaries) so stages start without compiling")
    e.add_argument("--qnn-w8", metavar="PATTERNS",
                   help="qnn: 8-bit weights also for these, e.g. 'layers.*.v,layers.*.o' (always: embed,lm_head)")
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
    st.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime intra-op threads (default 1: stages share the cores, and prompt chunks are "
                    "pipelined across stages so several run at once)")
    st.add_argument("--spin", action="store_true", help=SPIN_HELP)
    st.add_argument("--cpus", type=cpu_list, default=(),
                    help="pin the graph's compute, e.g. 0,1: the thread that runs it on the first CPU, ONNX Runtime's "
                    "other threads on the rest (default: unpinned; splitllm serve pins when the stages share the "
                    "cores)")
    st.add_argument("--allow-cpu-fallback", action="store_true",
                    help="qnn: run nodes the HTP backend rejects on the CPU (logged) instead of failing")
    st.add_argument("--event-loop", choices=["uvloop", "asyncio"],
                    default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
                    help="the loop that receives, runs and sends the steps: uvloop (libuv's, in C; the default where "
                    "it is installed: it is a dependency except on Windows) or asyncio's own, which spends more CPU "
                    "a message")
    st.set_defaults(run=cmd_stage)

    co = sub.add_parser("coordinator", help="serve the Generate API over a pipeline of stages")
    co.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    co.add_argument("--stages", required=True, help="stage addresses in pipeline order: ADDR1,ADDR2,...")
    co.add_argument("--listen", default="127.0.0.1:50051")
    co.add_argument("--metrics-port", type=int)
    co.add_argument("--max-concurrent", type=int, default=16, help="sessions running at once (others wait)")
    co.add_argument("--truncate-to-context", action="store_true",
                    help="a prompt plus max_tokens beyond the context generates until the context is full "
                    "(finish reason CONTEXT) instead of failing with INVALID_ARGUMENT")
    co.add_argument("--wait-stages", type=float, default=60.0, help="seconds to wait for the stages at start")
    co.add_argument("--prompt-chunks", choices=["spread", "full"], default="spread",
                    help="spread: a prompt goes in about one chunk per stage so that stages overlap (for stages "
                    "with cores to spare); full: chunks of the prefill length, one in the pipeline at a time "
                    "(stages that share their cores)")
    co.add_argument("--batches-in-flight", type=int, default=2,
                    help="the token steps of concurrent sessions go through the stages as one batch per step; "
                    "this many batches are in the pipeline at once, each with an even share of the sessions")
    add_draft_tokens(co)
    co.add_argument("--prompt-window", type=int, default=2,
                    help="with spread prompts, chunks of one session in the pipeline at once while others "
                    "decode; their token steps go in between, so a long prompt stalls them for about this many "
                    "chunks at a time")
    co.set_defaults(run=cmd_coordinator)

    ge = sub.add_parser("generate", help="one Generate call; prints the response summary")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--coordinator", default="127.0.0.1:50051")
    add_sampling(ge)
    ge.set_defaults(run=cmd_generate)

    se = sub.add_parser("serve", help="start the stages and the coordinator on loopback (exports smollm2 if needed)")
    se.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    se.add_argument("--kv-capacity", type=int, default=16)
    se.add_argument("--backend", default="cpu", choices=["cpu", "qnn"])
    se.add_argument("--stage-threads", type=int, default=2,
                    help="ONNX Runtime intra-op threads per stage (default 2, launcher.STAGE_THREADS says why); while "
                    "two stages fit the cores (2 x threads <= cores) the coordinator spreads prompts over the stages, "
                    "else it sends full chunks and one decode batch at a time")
    se.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                    help="stages' idle threads spin up to 50 us within a step (default: when a stage's threads take "
                    "every core, so that one stage computes at a time; launcher.spins_by_default)")
    se.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                    help="pin every stage's compute to the same cores, its calling thread on the first (default: "
                    "when the stages spin on shared cores; launcher.stage_cpus)")
    add_draft_tokens(se)
    se.set_defaults(run=cmd_serve)

    de = sub.add_parser("demo", help="serve, then run the model card's three sample prompts")
    de.add_argument("--artifacts", default=DEFAULT_ARTIFACTS)
    de.add_argument("--backend", default="cpu", choices=["cpu", "qnn"])
    add_sampling(de)
    de.set_defaults(run=cmd_demo)

    hu = sub.add_parser("hub", help="compile and profile the qnn stage graphs on Qualcomm AI Hub (needs a token)")
    hu.add_argument("action", choices=["compile", "profile"])
    hu.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="artifact exported with --target qnn")
    hu.add_argument("--device", required=True, help='AI Hub device name, e.g. "Snapdragon X Elite CRD"')
    hu.add_argument("--stages", help="1-based stage numbers, e.g. 1,2 (default: all)")
    hu.set_defaults(run=cmd_hub)

    be = sub.add_parser("bench", help="figures of the pipeline, the in-process chain and llama.cpp, same run")
    be.add_argument("--quick", action="store_true", help="a smoke check in under 3 minutes")
    be.add_argument("--artifacts", default="artifacts/smollm2-ctx2048",
                    help="artifact with context > 1024 (exported from the embedded model when missing)")
    be.add_argument("--gguf", help="GGUF for llama.cpp (default: the artifact's source)")
    be.add_argument("--reps", type=int, help="measured repetitions after the warm-up (default 5, --quick 2)")
    be.add_argument("--runtimes", help="default pipeline,chain,llamacpp,llamacpp_other (--quick: the first three). "
                    "llamacpp: its threads wait as the stages' do (the targets' reference); llamacpp_other: they wait "
                    "the other way (llamacpp_spin or llamacpp_sleep), a reference column")
    be.add_argument("--out", help="directory for bench.json, bench.png and the runtimes' logs (default bench/results)")
    be.add_argument("--llamacpp-threads", type=int, default=2)
    be.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                    help="every runtime's threads spin (llama.cpp's stock setting, stages within a step) or sleep; "
                    "default: as splitllm serve starts the stages (spinning llama.cpp collapses on a busy machine)")
    be.set_defaults(run=cmd_bench)
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
