"""`splitllm bench`: the same workloads on the same model through every runtime in one run.

Each runtime lives in its own child process (bench/runner.py). The runtimes take turns workload by
workload inside every repetition, so load from other processes on this machine falls on all of them
alike and the ratios hold even when the absolute figures drift. The first repetition is a warm-up.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from splitllm.bench import machine, report
from splitllm.services.client.launcher import STAGE_THREADS, spins_by_default, stage_cpus, stage_env

REFERENCE = Path(__file__).resolve().parents[1] / "../shared/reference/smollm2"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LENGTHS = (32, 128, 1024)


@dataclass(frozen=True)
class Plan:
    reps: int  # measured repetitions, after one warm-up
    gen_tokens: int
    streams: tuple[int, ...]
    stream_tokens: int
    ppl_windows: int | None  # None: every 512-token window of the text
    expected_minutes: tuple[float, float]  # 2 idle cores with / without AVX-512 VNNI (measured: Zen 5 / Zen 1)
    # Concurrent streams the warm-up runs. --quick leaves out the 16: on a slow host (Zen 1, AVX2) their prompts
    # alone take 2-4 s a runtime. The warm-up keeps every prompt length: "peak RSS, one stream" is read after it.
    warmup_streams: tuple[int, ...] | None = None  # None: `streams`

    @staticmethod
    def make(quick: bool, reps: int | None = None) -> Plan:
        if quick:
            return Plan(reps or 2, 64, (1, 4, 16), 8, 1, (1.5, 2.5), warmup_streams=(1, 4))
        return Plan(reps or 5, 128, (1, 4, 16), 64, None, (8.0, 15.0))


def expected_minutes(plan: Plan) -> float:
    """The plan's duration with the default runtimes as measured on a host of this kind: without VNNI the int8
    kernels (and, on the Zen 1 measured, everything else) take about twice as long."""
    fast, slow = plan.expected_minutes
    return fast if "avx512_vnni" in machine.cpu_flags() else slow


class Child:
    """A runner process and its line protocol."""

    def __init__(self, runtime: str, log: Path, *args: str, python: str = sys.executable,
                 env: dict[str, str] | None = None) -> None:
        """`python`: the interpreter (another venv runs another checkout); `env`: the environment (default this
        process's, for the chain as its stages get it)."""
        self.runtime, self.log = runtime, log
        if env is None and runtime == "chain":  # the chain runs the stage graphs as the stages do
            env = stage_env()
        self.proc = subprocess.Popen([python, "-m", "splitllm.bench.runner", "--runtime", runtime, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env=env)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = "\n".join(self.log.read_text().splitlines()[-15:])
            raise RuntimeError(f"the {self.runtime} runner exited (code {self.proc.poll()}); {self.log}:\n{tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg

    def ready(self) -> None:
        self._read()

    def call(self, op: str, **kwargs: object) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def single(child: Child, plan: Plan, prompts: dict[int, list[int]], out: dict[str, list]) -> None:
    """One repetition of the one-stream workloads on one runtime; appends a sample per figure to `out`."""
    for n in PROMPT_LENGTHS:
        s = child.call("ttft", tokens=prompts[n])["value"]
        out.setdefault(f"ttft_{n}", []).append(s)
        if n >= 128:
            out.setdefault(f"prompt_tps_{n}", []).append(n / s)
    for call, suffix in (("generate", ""), ("generate_plain", "_1"), ("generate_sampled", "_sampled")):
        tokens, times = child.call(call, tokens=prompts[32], n=plan.gen_tokens)["value"]
        if len(tokens) != plan.gen_tokens and (suffix != "_sampled" or len(tokens) < 16):  # a draw may end it
            raise RuntimeError(f"{child.runtime} generated {len(tokens)} tokens, not {plan.gen_tokens} (a stop token?)")
        tpot = (times[-1] - times[0]) / (len(times) - 1)
        out.setdefault(f"tpot{suffix}", []).append(tpot)
        out.setdefault(f"gen_tps{suffix}", []).append(1 / tpot)
        out[f"tokens{suffix}"] = tokens
        if call == "generate":  # tokens of one step share its time at the chain; the pipeline streams them apart
            out["steps"] = len(set(times)) - 1


def streams(child: Child, counts: tuple[int, ...], tokens: int, prompts: list[list[int]], out: dict[str, list]) -> None:
    for k in counts:
        r = child.call("streams", prompts=prompts[:k], n=tokens)
        out.setdefault(f"streams_{k}", []).append(r["value"] / r["seconds"])


def reference_perplexity(windows: int) -> dict:
    """llama.cpp's figure from the reference JSON (its chunks score equally many tokens: geometric mean)."""
    ref = json.loads((REFERENCE / "llamacpp_perplexity.json").read_text())
    chunks = ref["per_chunk"][:windows]
    gmean = lambda k: math.exp(sum(math.log(c[k]) for c in chunks) / len(chunks))  # noqa: E731
    return {"second_half": gmean("ppl_second_half"), "all_tokens": gmean("ppl_all"), "windows": len(chunks),
            "source": "reference JSON"}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def greedy_note(runtime: str, tokens: int, at: int | None, margin: float | None = None) -> str:
    """How `runtime`'s greedy tokens compare with llama.cpp's; `margin`: llama.cpp's two best logits' gap where they
    first differ (a near-tie there is rounding, a wide gap a fault)."""
    if at is None:
        return f"{runtime}: greedy {tokens} tokens identical to llama.cpp's"
    gap = "" if margin is None else f", where llama.cpp's two best logits are {margin:.3f} apart"
    return f"{runtime}: greedy {tokens} tokens first differ from llama.cpp's at token {at}{gap}"


def speculation_notes(samples: dict[str, dict], results: dict, tokens: int) -> list[str]:
    """What speculation did to the generation figures: steps, same tokens, and the ratios one token a step."""
    from splitllm.services.coordinator.engine import DRAFT_TOKENS

    notes = []
    if (steps := samples.get("chain", {}).get("steps")) is not None:
        notes.append(f"generation: the pipeline and the chain speculate as `splitllm serve` does for a lone request "
                     f"(prompt lookup, up to {DRAFT_TOKENS} draft tokens a step; llama.cpp does not): the "
                     f"chain took {steps} steps for the {tokens - 1} greedy tokens after the first "
                     f"({(tokens - 1) / max(steps, 1):.2f} a step); 'one token a step' rows: the same without")
    if "tokens_sampled" in samples.get("chain", {}):
        notes.append(f"sampled rows: {report.SAMPLED_LABEL}, seed {report.SAMPLED_SEED}, "
                     "the bench's prompt; the pipeline and the chain draw with our sampler (a guess is kept when the "
                     "draw is the guess), llama.cpp with its own sampler chain (top_k and min_p off): other random "
                     "numbers, so other tokens")
    for r in ("pipeline", "chain"):
        s = samples.get(r, {})
        if "tokens_1" in s and (d := first_divergence(s["tokens"], s["tokens_1"])) is not None:
            notes.append(f"{r}: speculating, greedy tokens first differ from one token a step at token {d} (a fault)")
    pipe, chain = (samples.get(r, {}).get("tokens_sampled") for r in ("pipeline", "chain"))
    if pipe and chain and (d := first_divergence(pipe, chain)) is not None:
        notes.append(f"pipeline: sampled tokens first differ from the chain's at token {d} (a fault: the same logits "
                     "and draws)")
    ratios = {r: report.vs_llamacpp(r, "gen_tps_1")(results, "llamacpp") for r in ("pipeline", "chain")}
    if shown := ", ".join(f"{r} / llama.cpp {v:.2f}x" for r, v in ratios.items() if v is not None):
        notes.append(f"one token a step: {shown}")
    if (over := report.overhead_ms(results, key="tpot_1")) is not None:
        notes.append(f"one token a step: pipeline overhead {over:.2f} ms a token")
    spreads = {label: report.overhead_by_repetition(results, key) for key, label in
               (("tpot", "as served"), ("tpot_1", "one token a step"))}
    if shown := "; ".join(f"{label} {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} ms"
                          for label, s in spreads.items() if s):
        notes.append(f"overhead within each repetition (the pipeline's TPOT minus the chain's, taking turns), min / "
                     f"median / max: {shown}")
    return notes


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def ensure_artifacts(artifacts: str) -> str:
    """The bench artifact: context 2048 like llama.cpp's n_ctx, so a 1024-token prompt plus answer fits."""
    from splitllm.services.common.manifest import MANIFEST_FILE, load_manifest

    if not (Path(artifacts) / MANIFEST_FILE).is_file():
        from splitllm.export.build import export
        from splitllm.export.sources import resolve

        print(f"exporting the embedded default model with context 2048 into {artifacts} ...", flush=True)
        export(resolve("smollm2"), artifacts, context=2048)
    m, _ = load_manifest(artifacts, verify=[])
    if m.context_length <= max(PROMPT_LENGTHS):
        raise ValueError(f"{artifacts} has context {m.context_length}: the 1024-token prompt needs more "
                         "(splitllm export ... --context 2048)")
    return m.source.get("path", "") if m.source.get("kind") == "gguf" else ""


OUTSIDE_LIMIT = 0.10  # share of the machine's CPU that other processes may take before --spin figures are suspect


def oversubscribed(outside_share: float, when: str = "during the run") -> str | None:
    """With --spin: other processes on the cores make spinning threads collapse (llama.cpp's at every barrier)."""
    if outside_share <= OUTSIDE_LIMIT:
        return None
    return (f"other processes took {outside_share:.0%} of the {os.cpu_count() or 1} cores {when}: llama.cpp's "
            "spinning threads (at every barrier) then run several times slower; run with --no-spin")


def skip_llamacpp(gguf: str) -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'splitllm[bench]'; it compiles llama.cpp, ~6 min)"
    return None if Path(gguf).is_file() else f"no GGUF file ({gguf!r}; pass --gguf)"


def reference_tokens(artifacts: str | Path) -> list[int]:
    """The reference perplexity text in the artifact's tokens: the bench's prompts and perplexity windows."""
    from splitllm.services.common.manifest import load_manifest
    from splitllm.services.coordinator.text import TextCodec

    m, _ = load_manifest(artifacts, verify=[])
    codec = TextCodec.from_file(Path(artifacts) / m.tokenizer["file"])
    return codec.encode((REFERENCE / "ppl_text.txt").read_text())


def run(artifacts: str, quick: bool = False, reps: int | None = None, gguf: str = "",
        runtimes: tuple[str, ...] | None = None, llamacpp_threads: int = 2,
        spin: bool | None = None, out_dir: str | Path | None = None) -> int:
    """`spin` None: as `splitllm serve` starts the stages. The chain's and llama.cpp's threads wait as the stages' do
    (the targets' llama.cpp); "llamacpp_other" is llama.cpp waiting the other way, a reference column that the
    full run has by default and --quick only when asked (it is never judged, and costs a quarter of the time)."""

    t_start, loads = time.monotonic(), [os.getloadavg()[0]]
    elapsed = lambda: clock(time.monotonic() - t_start)  # noqa: E731
    if spin is None:
        spin = spins_by_default(STAGE_THREADS)
    other = "llamacpp_sleep" if spin else "llamacpp_spin"
    plan, notes = Plan.make(quick, reps), []
    runtimes = runtimes or ("pipeline", "chain", "llamacpp", *(() if quick else ("llamacpp_other",)))
    runtimes = [other if r == "llamacpp_other" else r for r in runtimes]
    if unknown := set(runtimes) - set(report.RUNTIMES):
        allowed = ", ".join([*report.RUNTIMES, "llamacpp_other"])
        raise ValueError(f"unknown runtimes {sorted(unknown)} (allowed: {allowed})")
    source = ensure_artifacts(artifacts)
    gguf = gguf or source
    ids = reference_tokens(artifacts)
    prompts = {n: ids[:n] for n in PROMPT_LENGTHS}
    stream_prompts = [ids[32 * i : 32 * i + 32] for i in range(max(plan.streams))]
    ppl_tokens = ids[: 512 * plan.ppl_windows] if plan.ppl_windows else ids
    llamacpps = [r for r in runtimes if r.startswith("llamacpp")]
    if llamacpps and (why := skip_llamacpp(gguf)):
        print(f"skipping llama.cpp: {why}", flush=True)
        notes.append(f"llama.cpp skipped: {why}")
        runtimes = [r for r in runtimes if r not in llamacpps]
    print(f"splitllm bench{' --quick' if quick else ''}: {', '.join(runtimes)}; 1 warm-up + {plan.reps} "
          f"repetitions; expect about {expected_minutes(plan):.0f} min (longer when the machine is busy)", flush=True)
    host = machine.describe(measure=True)
    print(f"machine: {machine.summary(host)}", flush=True)
    if spin:  # the warning is about spinning threads: sample others' load only then
        before = machine.OutsideCpu()
        time.sleep(0.5)
        if warning := oversubscribed(before.share(), "just before the run"):
            print(f"warning: {warning}", flush=True)
    outside = machine.OutsideCpu()

    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["--artifacts", artifacts, "--gguf", gguf, "--threads", str(llamacpp_threads)]
    args += ["--spin"] if spin else []
    children = {r: Child(r, out_dir / f"{r}.log", *args) for r in runtimes}
    samples: dict[str, dict[str, list]] = {r: {} for r in runtimes}
    results: dict[str, dict] = {r: {} for r in runtimes}
    firsts: dict[str, int | None] = {}  # where the pipeline's and chain's greedy tokens first differ from llama.cpp's
    margins: dict[str, float] = {}  # llama.cpp's gap between its two best logits there
    try:
        for c in children.values():
            c.ready()
        print(f"[{elapsed()}] runtimes started", flush=True)
        t_loop = time.monotonic()
        for rep in range(plan.reps + 1):
            for r in runtimes[rep % len(runtimes) :] + runtimes[: rep % len(runtimes)]:
                single(children[r], plan, prompts, samples[r] if rep else {})
                if rep == 0:  # the peak with one stream at a time, as llama.cpp's single context runs
                    results[r]["rss"] = children[r].call("rss")["value"]
                    results[r]["pss"] = children[r].call("pss")["value"]
                counts = plan.streams if rep or plan.warmup_streams is None else plan.warmup_streams
                streams(children[r], counts, plan.stream_tokens, stream_prompts, samples[r] if rep else {})
            loads.append(os.getloadavg()[0])
            left = (time.monotonic() - t_loop) / (rep + 1) * (plan.reps - rep)
            if "chain" in samples and rep:  # the chain's perplexity runs token by token
                left += len(ppl_tokens) * statistics.median(samples["chain"]["tpot"])
            print(f"[{elapsed()}] {f'repetition {rep}/{plan.reps}' if rep else 'warm-up'} done, load average "
                  f"{loads[-1]:.1f}, other processes {outside.share():.0%} of the CPU; ~{clock(left)} left", flush=True)
        for r in runtimes:
            results[r]["figures"] = {k: report.summarize(v) for k, v in samples[r].items() if k in report.FIGURES}
            results[r]["rss_streams"] = children[r].call("rss")["value"]
        # The pipeline runs the chain's graphs, and the other llama.cpp does the same sums as this one.
        for r in [r for r in runtimes if r in ("chain", "llamacpp")]:
            print(f"[{elapsed()}] perplexity: {r} ...", flush=True)
            results[r]["perplexity"] = children[r].call("perplexity", tokens=ppl_tokens, ctx=512)["value"]
        if "llamacpp" in runtimes:  # how near a tie llama.cpp's pick was where ours first differ from it
            for r in [r for r in runtimes if r in ("pipeline", "chain")]:
                firsts[r] = d = first_divergence(samples[r]["tokens"], samples["llamacpp"]["tokens"])
                if d is not None:
                    before = prompts[32] + samples["llamacpp"]["tokens"][:d]
                    margins[r] = children["llamacpp"].call("margin", tokens=before)["value"]
        outside_share = outside.share()
    finally:
        for c in children.values():
            c.close()

    waits = "spin up to 50 us within a step" if spin else "sleep"
    serves = "splitllm serve's default" if spin == spins_by_default(STAGE_THREADS) else "not serve's default"
    cpus = stage_cpus(STAGE_THREADS, spin)
    pinned = f", their compute pinned to CPUs {','.join(map(str, cpus))}" if cpus else ""
    notes.append(f"stages: {STAGE_THREADS} ONNX Runtime threads each that {waits}{pinned} ({serves}); chain likewise, "
                 "unpinned")
    if "llamacpp" in runtimes:
        wait = "spin (stock)" if spin else "sleep (OMP_WAIT_POLICY=PASSIVE)"
        notes.append(f"llama.cpp: {llamacpp_threads} threads that {wait} at barriers, as the stages' wait, "
                     "n_batch 512; concurrent streams run one after another in its one context")
        if other in runtimes:
            notes.append(f"{report.RUNTIMES[other]}: the same llama.cpp with its threads waiting the other way, for "
                         "reference; the targets compare with the one whose threads wait as the stages' do")
        notes += [greedy_note(r, plan.gen_tokens, d, margins.get(r)) for r, d in firsts.items()]
    else:
        results["llamacpp"] = {"perplexity": reference_perplexity(len(ppl_tokens) // 512)}
        notes.append("llama.cpp perplexity quoted from the reference JSON (same text and windows)")
    notes += speculation_notes(samples, results, plan.gen_tokens)
    notes += ["TTFT is timed at the caller: for the pipeline at the gRPC client (raw token ids, max_tokens=1)",
              f"concurrent streams: {plan.stream_tokens} tokens each after a 32-token prompt; the chain interleaves "
              "them round robin in one thread",
              f"perplexity over {len(ppl_tokens) // 512} x 512-token windows; the pipeline runs the chain's graphs, "
              "one figure serves both",
              f"load average {min(loads):.1f} to {max(loads):.1f} during the run ({os.cpu_count()} cores, the bench's "
              f"own threads included); other processes took {outside_share:.0%} of the CPU (steal included)",
              f"machine: {machine.summary(host)}"]
    if spin and (warning := oversubscribed(outside_share)):
        notes.append(warning)
    targets = report.evaluate(results)
    doc = {"machine": host, "plan": asdict(plan), "artifacts": artifacts, "gguf": gguf,
           "llamacpp_threads": llamacpp_threads, "spin": spin, "load_average": loads,
           "outside_cpu_share": outside_share, "runtimes": results,
           "targets": targets, "notes": notes, "seconds": time.monotonic() - t_start}
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=1))
    print("\n" + report.render(results, targets, notes))
    try:
        report.chart(results, out_dir / "bench.png", f"load average {min(loads):.1f}-{max(loads):.1f}; "
                     f"{machine.summary(host)}")
        charted = f" and {out_dir / 'bench.png'}"
    except ImportError:
        charted = " (no chart: matplotlib is not installed, pip install 'splitllm[bench]')"
    print(f"\nwrote {out_dir / 'bench.json'}{charted} in {elapsed()}")
    return 0
