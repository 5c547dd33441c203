"""The three runtimes under one interface: the gRPC pipeline, the in-process chain, llama.cpp.

Every method times itself with the same clock at the same points: TTFT from the call to the first
token chosen (greedy), generation as the arrival time of every token.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

import numpy as np

from splitllm.bench.machine import cpu_flags
from splitllm.bench.report import SAMPLED, SAMPLED_SEED
from splitllm.services.common.heap import proc_bytes
from splitllm.services.coordinator.sampler import Sampler, SamplingParams

_ids = itertools.count()


def _proc_bytes(path: str, key: str) -> int:
    """A "Key:   N kB" figure of a /proc file, in bytes; RuntimeError where there is none."""
    value = proc_bytes(path, key)
    if value is None:
        raise RuntimeError(f"no {key} in {path}")
    return value


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    return _proc_bytes(f"/proc/{pid}/status", "VmHWM")


def pss(pid: int | str = "self") -> int:
    """Proportional set size now, in bytes: resident pages, each shared page split among the processes mapping
    it. Summed over processes it counts shared libraries once, where a sum of RSS counts them in every one."""
    return _proc_bytes(f"/proc/{pid}/smaps_rollup", "Pss")


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports after it (other workers' pipelines use the defaults)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"found no {n} free consecutive ports on 127.0.0.1")


def timed(tokens: Iterable[int], n: int) -> tuple[list[int], list[float]]:
    """The first n tokens of a generator and the seconds from the call to each."""
    out, times = [], []
    t0 = time.perf_counter()
    for token in tokens:
        out.append(token)
        times.append(time.perf_counter() - t0)
        if len(out) == n:
            break
    return out, times


class Chain:
    """The stage graphs chained in one process (no gRPC); streams interleave round robin in one thread. `generate`
    and `generate_sampled` speculate as the coordinator does for a lone request (the same draft tokens, so the same
    steps); `generate_plain` takes one token a step."""

    name = "chain"

    def __init__(self, artifacts: str, spin: bool = False, **_: object) -> None:
        from splitllm.services.stage.chain import LocalChain

        self.chain = LocalChain(artifacts, kv_capacity=16, threads=2, spin=spin)

    def _prefill(self, sid: str, tokens: list[int]) -> int:
        return int(np.argmax(self.chain.prefill_tokens(sid, tokens)))

    def _next(self, sid: str, position: int, token: int) -> int:
        return int(np.argmax(self.chain.step(sid, position, np.array([token], np.int32))))

    def ttft(self, tokens: list[int]) -> float:
        sid = f"ttft-{next(_ids)}"
        t0 = time.perf_counter()
        self._prefill(sid, tokens)
        dt = time.perf_counter() - t0
        self.chain.release(sid)
        return dt

    def generate_plain(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        sid, out, times = f"gen-{next(_ids)}", [], []
        t0 = time.perf_counter()
        try:
            out.append(self._prefill(sid, tokens))
            times.append(time.perf_counter() - t0)
            while len(out) < n:
                out.append(self._next(sid, len(tokens) + len(out) - 1, out[-1]))
                times.append(time.perf_counter() - t0)
        finally:
            self.chain.release(sid)
        return out, times

    def generate(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self._speculate(tokens, n, SamplingParams())

    def generate_sampled(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self._speculate(tokens, n, SamplingParams(**SAMPLED, seed=SAMPLED_SEED))

    def _speculate(self, tokens: list[int], n: int, params: SamplingParams) -> tuple[list[int], list[float]]:
        """As the coordinator's engine samples and speculates (without its stop tokens); tokens that one step yields
        share its time."""
        from splitllm.services.coordinator.draft import PromptLookup, accept
        from splitllm.services.coordinator.engine import DRAFT_TOKENS
        from splitllm.services.coordinator.pipeline import Logits

        sid, out, times, sampler = f"gen-{next(_ids)}", [], [], Sampler(params, params.seed)
        t0 = time.perf_counter()
        try:
            history = list(tokens)
            out.append(sampler.sample(Logits(self.chain.prefill_tokens(sid, tokens)), history))
            history.append(out[-1])
            times.append(time.perf_counter() - t0)
            lookup = PromptLookup(history)
            while len(out) < n:
                drafts = lookup.draft(min(DRAFT_TOKENS, n - len(out) - 1))
                feed = np.array([out[-1], *drafts], np.int32)
                logits = self.chain.step(sid, len(history) - 1, feed, len(feed))
                new = accept(sampler, Logits(logits), drafts, history)
                lookup.extend(new)
                out += new
                times += [time.perf_counter() - t0] * len(new)
        finally:
            self.chain.release(sid)
        return out, times

    def streams(self, prompts: list[list[int]], n: int) -> int:
        sids = [f"stream-{next(_ids)}" for _ in prompts]
        try:
            last = [self._prefill(s, p) for s, p in zip(sids, prompts, strict=True)]
            for k in range(1, n):
                last = [self._next(s, len(p) + k - 1, t) for s, p, t in zip(sids, prompts, last, strict=True)]
        finally:
            for s in sids:
                self.chain.release(s)
        return n * len(prompts)

    def perplexity(self, tokens: list[int], ctx: int) -> dict:
        from splitllm.export.evaluate import perplexity

        return perplexity(self.chain, tokens, ctx).__dict__

    def rss(self) -> dict[str, int]:
        return {"total": peak_rss()}

    def pss(self) -> int:
        return pss()

    def close(self) -> None:
        pass


class Pipeline:
    """`splitllm serve`'s processes (four stages and the coordinator) on free loopback ports; a gRPC client."""

    name = "pipeline"

    def __init__(self, artifacts: str, spin: bool = False, **_: object) -> None:
        """Stages as `splitllm serve` starts them (2 threads each), their threads spinning within a step or not."""
        from splitllm.services.client.client import Client
        from splitllm.services.client.launcher import Pipeline as Processes
        from splitllm.services.client.launcher import Service, spawn, wait_serving

        base = free_port_block(5)
        self.processes = Processes(artifacts, base_port=base, coordinator_port=base + 4, metrics_base=None,
                                   kv_capacity=16, stage_spin=spin).start()
        self.client = Client(self.processes.coordinator.address)
        # generate_plain's: a second coordinator on the same stages that never speculates (idle otherwise)
        addr = f"127.0.0.1:{free_port_block(1)}"
        args = self.processes.coordinator_args(addr, [s.address for s in self.processes.stages])
        self.plain = Service("coordinator, one token a step", addr, 0,
                             spawn([*args, "--draft-tokens", "0"]))
        try:
            wait_serving(self.plain, time.monotonic() + 60)
        except BaseException:
            self.close()
            raise
        self.plain_client = Client(addr)

    def _stream(self, tokens: list[int], n: int, client: object = None, **sampling: object) -> tuple[list[int],
                                                                                                  list[float]]:
        out, times = [], []
        t0 = time.perf_counter()
        for msg in (client or self.client).stream(token_ids=tokens, max_tokens=n, **sampling):
            times += [time.perf_counter() - t0] * len(msg.token_ids)
            out += msg.token_ids
        return out, times

    def ttft(self, tokens: list[int]) -> float:
        return self._stream(tokens, 1)[1][0]

    def generate(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self._stream(tokens, n)

    def generate_plain(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self._stream(tokens, n, self.plain_client)

    def generate_sampled(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self._stream(tokens, n, **SAMPLED, seed=SAMPLED_SEED)

    def streams(self, prompts: list[list[int]], n: int) -> int:
        counts = [0] * len(prompts)

        def one(i: int) -> None:
            counts[i] = len(self._stream(prompts[i], n)[0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)

    def perplexity(self, tokens: list[int], ctx: int) -> None:
        return None  # the same graphs as the chain: its figure serves both

    def rss(self) -> dict[str, int]:
        peaks = {s.name: peak_rss(s.proc.pid) for s in self.processes.services}
        return peaks | {"total": sum(peaks.values())}

    def pss(self) -> int:
        return sum(pss(s.proc.pid) for s in self.processes.services)

    def close(self) -> None:
        self.client.close()
        if hasattr(self, "plain_client"):
            self.plain_client.close()
        if hasattr(self, "plain"):
            self.plain.proc.terminate()
            self.plain.proc.wait(10)
        self.processes.stop()


# Runs in a throwaway process: a prompt of several tokens through llama.cpp's default buffer types.
_AMX_PROBE = """import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"a prompt of several tokens"))"""


def amx_kernels_crash(gguf: str) -> bool:
    """Whether llama.cpp dies with SIGILL in its AMX matmul here.

    On a CPU with AMX, llama-cpp-python 0.3.36 built natively puts matmul weights in ggml's AMX buffer type. On the
    project's Xeon VM its AMX matmul dies with SIGILL for any batch of more than one token (a `tileloadd` in
    ggml_backend_amx_mul_mat, even after arch_prctl has granted the process the tile state), so it is tried in
    a throwaway process first; where it works, llama.cpp keeps it.
    """
    if "amx_int8" not in cpu_flags():
        return False
    probe = subprocess.run([sys.executable, "-c", _AMX_PROBE, gguf], capture_output=True, timeout=300)
    return probe.returncode == -signal.SIGILL


def _without_extra_buffer_types(llama_cpp: object) -> None:
    """Load models with `use_extra_bufts` off, which llama-cpp-python's Llama() does not expose. llama.cpp then
    takes its AVX-512 VNNI kernels: on the Xeon VM as fast as a build without AMX (-DGGML_NATIVE=OFF with the
    AVX-512 flags) in a same-run A/B, prompt 1024 ~140-210 tok/s and decode ~30-70 tok/s for both."""
    module = llama_cpp.llama_cpp  # the ctypes bindings, which llama_cpp.llama reads the default from
    default = module.llama_model_default_params

    def params():  # a ctypes struct
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the same GGUF; one context runs streams one after another.

    By default its OpenMP threads sleep at barriers (OMP_WAIT_POLICY=PASSIVE), as the stages' ONNX Runtime
    threads do: spinning threads (llama.cpp's stock setting, `spin`) run 10-20x slower as soon as other
    processes want the cores, which on a shared machine says nothing about either runtime.
    """

    name = "llamacpp"

    def __init__(self, gguf: str, threads: int = 2, spin: bool = False, **_: object) -> None:
        if not spin:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when libgomp loads, with llama_cpp
        import llama_cpp

        if amx_kernels_crash(gguf):
            print("llama.cpp: its AMX matmul dies with SIGILL on this machine; loading without extra buffer types "
                  "(its AVX-512 kernels)", file=sys.stderr, flush=True)
            _without_extra_buffer_types(llama_cpp)
        self.gguf, self.lib, self.threads = gguf, llama_cpp, threads
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, logits_all=False,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _eval(self, tokens: list[int]) -> int:
        """Greedy token after `tokens` (logits_all=False keeps only the last row, read straight from the context)."""
        self.llm.eval(tokens)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def ttft(self, tokens: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self._eval(tokens)
        return time.perf_counter() - t0

    def margin(self, tokens: list[int]) -> float:
        """The gap between the two largest logits after `tokens`: how near a tie its greedy pick there was."""
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        second, first = np.partition(logits, -2)[-2:]
        return float(first - second)

    def generate(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        self.llm.reset()
        out, times = [], []
        t0 = time.perf_counter()
        out.append(self._eval(tokens))
        times.append(time.perf_counter() - t0)
        while len(out) < n:
            out.append(self._eval([out[-1]]))
            times.append(time.perf_counter() - t0)
        return out, times

    def generate_plain(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        return self.generate(tokens, n)  # llama.cpp's eval loop: one token a step either way

    def generate_sampled(self, tokens: list[int], n: int) -> tuple[list[int], list[float]]:
        """llama.cpp's own sampler chain (llama-cpp-python's Llama.generate) at SAMPLED's settings: top_k and min_p
        off as in ours."""
        self.llm.set_seed(SAMPLED_SEED)
        return timed(self.llm.generate(tokens, top_k=0, top_p=SAMPLED["top_p"], min_p=0.0,
                                       temp=SAMPLED["temperature"], repeat_penalty=1.0, reset=True), n)

    def streams(self, prompts: list[list[int]], n: int) -> int:
        return sum(len(self.generate(p, n)[0]) for p in prompts)

    def perplexity(self, tokens: list[int], ctx: int) -> dict:
        """As export/evaluate.py: non-overlapping windows from an empty cache, no BOS, float64 log-softmax."""
        llm = self.lib.Llama(model_path=self.gguf, n_ctx=ctx, n_threads=self.threads, n_batch=ctx, logits_all=True,
                             verbose=False)
        nll_half = nll_all = 0.0
        n_half = n_all = 0
        windows = len(tokens) // ctx
        for w in range(windows):
            chunk = tokens[w * ctx : (w + 1) * ctx]
            llm.reset()
            llm.eval(chunk)
            x = llm.scores[: ctx - 1].astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lp = x[np.arange(ctx - 1), chunk[1:]] - (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
            nll_all -= lp.sum()
            nll_half -= lp[ctx // 2 :].sum()
            n_all, n_half = n_all + ctx - 1, n_half + len(lp[ctx // 2 :])
        return {"second_half": float(np.exp(nll_half / n_half)), "all_tokens": float(np.exp(nll_all / n_all)),
                "scored_second_half": n_half, "scored_all": n_all, "windows": windows}

    def rss(self) -> dict[str, int]:
        return {"total": peak_rss()}

    def pss(self) -> int:
        return pss()

    def close(self) -> None:
        self.llm.close()


class LlamaCppSpinning(LlamaCpp):
    """llama.cpp as it ships, threads spinning at barriers, whatever the run's --spin: a reference column beside
    the llama.cpp that waits as the stages do. On an idle machine spinning is llama.cpp's best single-stream speed:
    on the 2-core AMD EPYC (Zen 5) host of 2026-12-06, 5.5-5.9 ms a token against 20-22 ms with sleeping threads,
    which wake at every barrier."""

    name = "llamacpp_spin"

    def __init__(self, gguf: str, threads: int = 2, **_: object) -> None:
        super().__init__(gguf, threads, spin=True)


class LlamaCppSleeping(LlamaCpp):
    """llama.cpp with sleeping threads (OMP_WAIT_POLICY=PASSIVE), whatever the run's --spin: the reference column
    when the stages spin."""

    name = "llamacpp_sleep"

    def __init__(self, gguf: str, threads: int = 2, **_: object) -> None:
        super().__init__(gguf, threads, spin=False)


RUNTIMES = {r.name: r for r in (Pipeline, Chain, LlamaCpp, LlamaCppSpinning, LlamaCppSleeping)}
