"""`splitllm serve`: the stages and the coordinator as separate processes on loopback.

Exports the default model first when the artifact directory is missing, waits until every process
reports SERVING over gRPC health, and stops them all on Ctrl-C, SIGTERM, or when any one of them dies. A process
started here also ends when the process that started it dies in any way (follow_parent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitllm.services.common.manifest import MANIFEST_FILE, load_manifest

HOST = "127.0.0.1"
COORDINATOR_PORT, STAGE_PORT = 50051, 50061  # stages: 50061, 50062, ...
COORDINATOR_METRICS, STAGE_METRICS = 9400, 9401  # stages: 9401, 9402, ...
# Intra-op threads per stage that `splitllm serve` starts: 2, one stage computing at a time (one_stage_at_a_time
# says how they wait). Same-run A/B on the 2-core AVX2 host, 8 repetitions, 2 sleeping threads
# against 1 thread and prompts spread over the stages: TPOT 14.3 -> 12.3 ms, TTFT of a chat prompt 115 -> 100 ms,
# 4 streams 93 tok/s both, 16 streams 136 -> 130 tok/s, 1024-token prompt 2.17 -> 2.20 s. A single stream leaves the
# other core idle, and lm_head's one large node splits over both threads (stage 4: 4.55 -> 3.71 ms a token). On the
# Zen 5 host 1 sleeping thread was ahead (3 A/Bs: TPOT -4 to -16 %, TTFT and streams within +-8 %), and 2 spinning
# threads with one batch in flight ahead of both.
STAGE_THREADS = 2
# With this in a stage's GLIBC_TUNABLES, glibc's malloc backs big blocks with transparent huge pages (THP "madvise"
# or "always"). It was for ONNX Runtime's prepacked weights (Zen 3: the chain's token -4.7 %); our kernels now read the
# weights in place from the mapped file, and what it backs is the heap of ONNX Runtime's runs: on the Zen 5 host
# (`python bench/pipeline_ab.py`, 12 rounds) TTFT -13.8 % (lower in 9), TPOT +0.0 %, peak RSS +8 MB. glibc reads it
# when a process starts, so it goes in the stage's environment.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
PARENT_PID = "SPLITLLM_PARENT_PID"  # set in the environment of the processes started here: follow_parent
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Service:
    name: str
    address: str
    metrics_port: int
    proc: subprocess.Popen


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitllm.services.client.cli", *args]


def spawn(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """`splitllm <args>` as a child that follows this process (follow_parent); `env` default: this process's. Call
    it from a thread that lives as long as the child should: Linux signals the child when the thread that started
    it ends."""
    return subprocess.Popen(cli(*args), env={**(os.environ if env is None else env), PARENT_PID: str(os.getpid())})


def follow_parent() -> None:
    """In a process that spawn started: SIGTERM (whose handler stops the service as Ctrl-C does) once its parent
    dies, even by SIGKILL, instead of living on as an orphan that holds its port and memory. No-op elsewhere."""
    parent = os.environ.pop(PARENT_PID, None)  # not passed on to this process's own children
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def stop(procs: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM (a clean stop) to each of `procs` still running, in order; then wait for each, and kill one that has
    not exited within `timeout`: none is left behind holding its port and memory. Exit codes: Popen.returncode."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stage_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with HUGE_PAGES added to GLIBC_TUNABLES, unless it sets that tunable."""
    env = dict(os.environ if env is None else env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.split("=")[0] == HUGE_PAGES.split("=")[0] for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES])
    return env


def wait_serving(svc: Service, deadline: float) -> None:
    with grpc.insecure_channel(svc.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.proc.returncode} while starting")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{svc.name} at {svc.address} did not become healthy in time")
            time.sleep(0.1)


def one_stage_at_a_time(stage_threads: int) -> bool:
    """Whether a stage's threads take every core, so that two stages computing at once would share them. Then
    prompts go in full chunks, one decode batch is in flight (--batches-in-flight 1: the next batch waits for the
    answer instead of running beside another) and the stages spin within a step (spins_by_default; they sleep
    between steps). Same-run A/B against serve's settings before (2 sleeping threads, 2 batches in flight; 2-core
    AMD EPYC Zen 5, 4 turns of 3, medians): TPOT 9.92 -> 7.56 ms, TTFT 32 tokens 38.1 -> 31.9 ms, 1000 tokens 796
    -> 777 ms, 4 streams 207 -> 288 tok/s, 16 streams 383 -> 459 tok/s; one batch in flight alone, threads
    sleeping: 9.45 ms, 36.7 ms, 747 ms, 251 and 407 tok/s."""
    return 2 * stage_threads > (os.cpu_count() or 1)


def spins_by_default(stage_threads: int) -> bool:
    """Stages spin within a step when one computes at a time and each of its threads has a core to spin on (2
    threads on 1 core: a spinning thread would hold the core the other one waits for)."""
    return one_stage_at_a_time(stage_threads) and stage_threads <= (os.cpu_count() or 1)


def stage_cpus(stage_threads: int, spin: bool, pin: bool | None = None, backend: str = "cpu") -> tuple[int, ...]:
    """What `splitllm serve` passes as each stage's --cpus: when pinned (`pin` None: when the stages spin on shared
    cores), the first `stage_threads` CPUs this process may use, the same for every stage (the first for the thread
    that runs the graph, the next for ONNX Runtime's workers); else nothing. Unpinned, a stage's worker woken at the
    start of a step after the stage idled was at times put on the calling thread's core while the other one idled,
    and the two took turns there. The 4 graphs in one process, a 1 ms sleep before each stage's step (as its idle time
    in the pipeline; a scratch script): 7.39 / 7.41 -> 5.06 / 4.70 ms a token. `bench/pipeline_ab.py`, serve's settings:
    TPOT -8.3 % (B lower in 9 of 10 rounds) and -3.8 % (10 of 16), TTFT -4.1 / -0.8 %."""
    pinned = spin if pin is None else pin
    return tuple(sorted(os.sched_getaffinity(0))[:stage_threads]) if pinned and backend == "cpu" else ()


class Pipeline:
    """The running processes of one pipeline; a context manager that always stops them."""

    def __init__(self, artifacts: str | Path, base_port: int = STAGE_PORT, coordinator_port: int = COORDINATOR_PORT,
                 metrics_base: int | None = COORDINATOR_METRICS, kv_capacity: int = 16, backend: str = "cpu",
                 stage_threads: int = STAGE_THREADS, stage_spin: bool | None = None, stage_pin: bool | None = None,
                 extra_coordinator_args: list[str] | None = None) -> None:
        """`stage_spin` None: spins_by_default. `stage_pin` None: pin (stage_cpus) when the stages spin."""
        self.artifacts = str(artifacts)
        self.base_port, self.coordinator_port, self.metrics_base = base_port, coordinator_port, metrics_base
        self.kv_capacity, self.backend = kv_capacity, backend
        self.stage_threads = stage_threads
        self.stage_spin = spins_by_default(stage_threads) if stage_spin is None else stage_spin
        self.stage_cpus = stage_cpus(stage_threads, self.stage_spin, stage_pin, backend)
        self.extra = extra_coordinator_args or []
        self.services: list[Service] = []

    @property
    def coordinator(self) -> Service:
        return self.services[-1]

    @property
    def stages(self) -> list[Service]:
        return self.services[:-1]

    def metrics_port(self, i: int) -> int:
        """0: coordinator, k: stage k (1-based); 0 when metrics are off."""
        return self.metrics_base + i if self.metrics_base else 0

    def one_stage_at_a_time(self) -> bool:
        return one_stage_at_a_time(self.stage_threads)

    def stage_process(self, k: int) -> Service:
        """Start stage k (0-based) on its fixed address."""
        addr = f"{HOST}:{self.base_port + k}"
        args = ["stage", "--artifacts", self.artifacts, "--stage", str(k + 1), "--listen", addr,
                "--backend", self.backend, "--kv-capacity", str(self.kv_capacity)]
        if self.metrics_base:
            args += ["--metrics-port", str(self.metrics_port(k + 1))]
        args += ["--threads", str(self.stage_threads)]
        if self.stage_spin:
            args.append("--spin")
        if self.stage_cpus:
            args += ["--cpus", ",".join(map(str, self.stage_cpus))]
        proc = spawn(args, stage_env())
        return Service(f"stage {k + 1}", addr, self.metrics_port(k + 1), proc)

    def coordinator_args(self, listen: str, stages: list[str]) -> list[str]:
        args = ["coordinator", "--artifacts", self.artifacts, "--listen", listen, "--stages", ",".join(stages),
                "--max-concurrent", str(self.kv_capacity),
                "--prompt-chunks", "full" if self.one_stage_at_a_time() else "spread"]
        if self.one_stage_at_a_time():
            args += ["--batches-in-flight", "1"]
        if self.metrics_base:
            args += ["--metrics-port", str(self.metrics_port(0))]
        return args + self.extra

    def restart_stage(self, k: int, timeout: float = 60.0) -> None:
        self.services[k] = self.stage_process(k)
        wait_serving(self.services[k], time.monotonic() + timeout)

    def start(self, timeout: float = 120.0) -> Pipeline:
        manifest, _ = load_manifest(self.artifacts, verify=[])
        deadline = time.monotonic() + timeout
        try:
            for k in range(manifest.num_stages):
                self.services.append(self.stage_process(k))
            for s in self.services:
                wait_serving(s, deadline)
            addr = f"{HOST}:{self.coordinator_port}"
            proc = spawn(self.coordinator_args(addr, [s.address for s in self.services]))
            self.services.append(Service("coordinator", addr, self.metrics_port(0), proc))
            wait_serving(self.coordinator, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def dead(self) -> Service | None:
        return next((s for s in self.services if s.proc.poll() is not None), None)

    def stop(self) -> None:
        """The coordinator first: it releases its last sessions after their calls, while the stages still
        serve; then the stages."""
        coordinators = [s for s in self.services if s.name == "coordinator"]
        for group in (coordinators, [s for s in self.services if s not in coordinators]):
            stop([s.proc for s in reversed(group)])

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_artifacts(artifacts: str | Path) -> None:
    """Export the embedded default model into `artifacts` when it holds no artifact yet."""
    if (Path(artifacts) / MANIFEST_FILE).is_file():
        return
    from splitllm.export.build import export
    from splitllm.export.sources import resolve

    print(f"{artifacts} holds no artifact: exporting the embedded default model (smollm2) ...", flush=True)
    export(resolve("smollm2"), artifacts)


def describe(p: Pipeline) -> str:
    lines = [f"{s.name:12s} grpc {s.address:18s} metrics http://{HOST}:{s.metrics_port}/metrics" for s in p.services]
    return "\n".join(lines)


def serve(artifacts: str, **kwargs: object) -> int:
    ensure_artifacts(artifacts)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Pipeline(artifacts, **kwargs) as p:  # type: ignore[arg-type]
        print(describe(p), flush=True)
        hint = f"splitllm generate --coordinator {p.coordinator.address} --prompt '...'"
        print(f"ready: {hint}  (Ctrl-C stops)", flush=True)
        while not stop:
            dead = p.dead()
            if dead:
                print(f"{dead.name} exited with code {dead.proc.returncode}; stopping the pipeline", file=sys.stderr)
                return 1
            time.sleep(0.2)
    print("stopped", flush=True)
    return 0
