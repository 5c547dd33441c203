"""End to end: four stage processes and a coordinator on real loopback sockets."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitllm.bench.machine import waits_and_pages
from splitllm.bench.runtimes import free_port_block
from splitllm.protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from splitllm.services.client.client import Client
from splitllm.services.client.launcher import Pipeline, Service, cli, stop, wait_serving
from splitllm.services.common.tensor import to_proto
from splitllm.services.coordinator.remote import prefill_chunk
from splitllm.services.stage.chain import LocalChain
from splitllm.services.stage.server import huge_page_bytes

KV_CAPACITY = 4


def start_pipeline(artifacts) -> Pipeline:
    base = free_port_block(5)
    return Pipeline(artifacts, base_port=base, coordinator_port=base + 4, metrics_base=free_port_block(5),
                    kv_capacity=KV_CAPACITY)


@pytest.fixture(scope="module")
def pipeline(smollm2_artifacts):
    with start_pipeline(smollm2_artifacts) as p:
        yield p


@pytest.fixture(scope="module")
def client(pipeline):
    with Client(pipeline.coordinator.address) as c:
        yield c


@pytest.fixture(scope="module")
def exact(smollm2_exact_artifacts):
    """(pipeline, client) for the tests that compare batched decoding with solo runs token for token: float
    matmuls, whose results do not depend on how many sessions share a run (conftest.smollm2_exact_artifacts
    says why the default's int8 matmuls can part at a near-tie)."""
    with start_pipeline(smollm2_exact_artifacts) as p, Client(p.coordinator.address) as c:
        yield p, c


def stage_stubs(pipeline) -> list[stage_pb2_grpc.StageStub]:
    return [stage_pb2_grpc.StageStub(grpc.insecure_channel(s.address)) for s in pipeline.stages]


def sessions_in_use(pipeline) -> list[int]:
    return [s.Info(stage_pb2.InfoRequest()).sessions_in_use for s in stage_stubs(pipeline)]


def wait_released(pipeline, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (used := sessions_in_use(pipeline)) != [0] * len(pipeline.stages) and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


def test_greedy_equals_in_process_chain_and_llamacpp(client, pipeline, smollm2_artifacts, reference):
    chain = LocalChain(smollm2_artifacts)
    for p in reference["prompts"]:
        out = client.generate(prompt=p["prompt"], max_tokens=30)
        assert out.text == p["greedy_text"], p["prompt"]
        assert out.token_ids == chain.greedy(p["prompt_token_ids"], 30, stop_ids={2})
        assert out.token_ids[: len(p["greedy_token_ids"])] == p["greedy_token_ids"]
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_speculative_steps_over_the_pipeline_give_the_chains_greedy_tokens(client, pipeline, smollm2_artifacts):
    """A lone greedy request speculates (serve's default): the reference text's first 32 tokens continue in ways
    that repeat, so guesses are fed and kept; the tokens are the chain's one step at a time, in fewer steps."""
    from splitllm.bench.suite import reference_tokens

    prompt = reference_tokens(smollm2_artifacts)[:32]
    ports = [s.metrics_port for s in pipeline.services]
    before = [scrape(p) for p in ports]
    out = client.generate(token_ids=prompt, max_tokens=64)
    time.sleep(0.2)
    after = [scrape(p) for p in ports]
    assert out.token_ids == LocalChain(smollm2_artifacts).greedy(prompt, 64)
    accepted = after[-1]["splitllm_draft_tokens_total{outcome=accepted}"] - \
        before[-1]["splitllm_draft_tokens_total{outcome=accepted}"]
    key = "splitllm_stage_forward_seconds_count{mode=token}"
    steps = [a[key] - b[key] for b, a in zip(before[:-1], after[:-1], strict=True)]
    assert accepted > 0 and steps == [63 - accepted] * 4  # each kept guess saves a step
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_a_sampled_request_speculates_too_and_draws_a_seeds_tokens(client, pipeline, smollm2_artifacts):
    """Sampled, a lone request speculates as well: the last stage answers the top 40 of each row, and a guess is kept
    when the token drawn from its row is the guess. The draws are one step at a time's, so the tokens are those of
    the in-process engine going one token a step with the same seed."""
    from splitllm.bench.suite import reference_tokens
    from splitllm.protos import coordinator_pb2 as pb
    from splitllm.services.coordinator.engine import Engine
    from splitllm.services.coordinator.pipeline import LocalPipeline

    prompt, sampling = reference_tokens(smollm2_artifacts)[:32], dict(temperature=0.5, top_k=40, seed=7)
    port = pipeline.coordinator.metrics_port
    before = scrape(port)["splitllm_draft_tokens_total{outcome=accepted}"]
    out = client.generate(token_ids=prompt, max_tokens=64, **sampling)
    accepted = scrape(port)["splitllm_draft_tokens_total{outcome=accepted}"] - before
    one_step = Engine(LocalPipeline(str(smollm2_artifacts)), artifacts=smollm2_artifacts, draft_tokens=0)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=64,
                                 sampling=pb.SamplingParams(**sampling))
    assert out.token_ids == [t for m in one_step.generate(request) for t in m.token_ids] and accepted > 0
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_eight_concurrent_generates_match_their_solo_runs(exact):
    pipeline, client = exact
    prompts = [f"Tell me one fact about the number {i}." for i in range(8)]
    kwargs = [dict(prompt=p, max_tokens=24, temperature=0.8, top_p=0.95, seed=100 + i) for i, p in enumerate(prompts)]
    solo = [client.generate(**kw).token_ids for kw in kwargs]
    key = "splitllm_stage_batch_size_%s{mode=token}"
    before = scrape(pipeline.stages[2].metrics_port)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda kw: client.generate(**kw).token_ids, kwargs))
    after = scrape(pipeline.stages[2].metrics_port)
    assert together == solo
    assert len({tuple(t) for t in solo}) > 1
    steps, entries = (after[key % k] - before[key % k] for k in ("count", "sum"))
    assert entries > steps  # token steps of concurrent sessions went through the stages in batches
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_batches_survive_cancellations_and_newcomers(exact):
    """Six greedy requests through 4 KV slots: two are cancelled mid-stream, the queued ones join the running
    batches in the freed slots (sessions move between slots). The others get exactly their solo outputs,
    and no KV is left anywhere."""
    pipeline, client = exact
    kwargs = [dict(prompt=f"Name a colour and a fruit, number {i}.", max_tokens=20) for i in range(6)]
    solo = [client.generate(**kw).token_ids for kw in kwargs]

    def run(i: int) -> list[int] | None:
        stream = client.stub.Generate(client.request(**kwargs[i]))
        ids: list[int] = []
        for msg in stream:
            ids += msg.token_ids
            if i in (1, 2) and len(ids) == 4:
                stream.cancel()
                return None
        return ids

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, range(6)))
    assert [t for i, t in enumerate(together) if i not in (1, 2)] == [t for i, t in enumerate(solo) if i not in (1, 2)]
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_two_coordinators_share_the_stages(exact):
    """A second coordinator process on the same four stages: the sessions of both run at once, each
    coordinator batching its own and getting its own answers; a cancellation through one leaves the other's
    sessions alone; every session is released on every stage, also when a coordinator stops right after a
    call."""
    pipeline, client = exact
    addr = f"127.0.0.1:{free_port_block(1)}"
    stages = ",".join(s.address for s in pipeline.stages)
    second = Service("coordinator 2", addr, 0, subprocess.Popen(cli(
        "coordinator", "--artifacts", pipeline.artifacts, "--stages", stages, "--listen", addr)))
    try:
        wait_serving(second, time.monotonic() + 60)
        kwargs = [dict(prompt=f"Name an animal and a city, number {i}.", max_tokens=16, temperature=0.7, seed=i)
                  for i in range(4)]
        solo = [client.generate(**kw).token_ids for kw in kwargs]
        with Client(addr) as other:
            via = [client, other, client, other]

            def run(i: int) -> list[int] | None:
                stream = via[i].stub.Generate(via[i].request(**kwargs[i]))
                ids: list[int] = []
                for msg in stream:
                    ids += msg.token_ids
                    if i == 3 and len(ids) == 4:
                        stream.cancel()
                        return None
                return ids

            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(run, range(4)))
            assert together[:3] == solo[:3] and together[3] is None
            assert wait_released(pipeline) == [0, 0, 0, 0]
            other.generate(**kwargs[0])  # its release runs after the call: stopping now must not leak it
        stop([second.proc])
        assert second.proc.returncode == 0
        assert wait_released(pipeline) == [0, 0, 0, 0]
    finally:
        stop([second.proc])


def test_a_stage_replica_on_asyncios_own_loop_serves_a_route(pipeline, reference):
    """Stages run on uvloop by default; `--event-loop asyncio` is the fallback (Windows, or uvloop missing). A replica
    of stage 2 on it, in the route of a second coordinator, gives the greedy text, and its log says which loop."""
    base = free_port_block(2)
    replica, coordinator = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    stage = subprocess.Popen(cli("stage", "--artifacts", pipeline.artifacts, "--stage", "2", "--listen", replica,
                                 "--event-loop", "asyncio"), stderr=subprocess.PIPE, text=True)
    route = [s.address for s in pipeline.stages]
    route[1] = replica
    second = None
    try:
        wait_serving(Service("stage 2 replica", replica, 0, stage), time.monotonic() + 60)
        second = subprocess.Popen(cli("coordinator", "--artifacts", pipeline.artifacts, "--stages", ",".join(route),
                                      "--listen", coordinator))
        wait_serving(Service("coordinator 2", coordinator, 0, second), time.monotonic() + 60)
        p = reference["prompts"][1]
        with Client(coordinator) as c:
            assert c.generate(prompt=p["prompt"], max_tokens=30).text == p["greedy_text"]
    finally:
        for proc in (second, stage):  # the coordinator first: it releases its session through the replica
            if proc is not None:
                stop([proc])
    assert (second.returncode, stage.returncode) == (0, 0)
    assert "asyncio event loop" in stage.stderr.read()
    assert wait_released(pipeline) == [0, 0, 0, 0]


TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())  # syscall numbers


@pytest.mark.skipif(not sys.platform.startswith("linux") or TGKILL is None, reason="tgkill: Linux on x86_64, aarch64")
def test_a_coordinator_stops_on_sigterm_whichever_thread_the_kernel_hands_it_to(pipeline):
    """The kernel may deliver a SIGTERM sent to the process to any of its threads. Python runs the handler in the main
    thread once that thread runs Python again: an untimed wait there missed a third of the SIGTERMs of `splitllm
    coordinator` (`splitllm serve` then killed it after 10 s). Here the signal goes to one of gRPC's threads."""
    import ctypes

    addr = f"127.0.0.1:{free_port_block(1)}"
    proc = subprocess.Popen(cli("coordinator", "--artifacts", pipeline.artifacts, "--listen", addr,
                                "--stages", ",".join(s.address for s in pipeline.stages)))
    try:
        wait_serving(Service("coordinator 2", addr, 0, proc), time.monotonic() + 60)
        with Client(addr) as c:
            c.generate(prompt="hi", max_tokens=2)
        thread = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))  # not the main thread (tid == pid)
        assert thread != proc.pid
        assert ctypes.CDLL(None, use_errno=True).syscall(TGKILL, proc.pid, thread, signal.SIGTERM) == 0
        assert proc.wait(10) == 0
    finally:
        stop([proc])
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_stream_deltas_and_usage(client, reference):
    p = reference["prompts"][1]
    msgs = list(client.stream(prompt=p["prompt"], max_tokens=30))
    assert "".join(m.text for m in msgs) == p["greedy_text"]
    last = msgs[-1]
    assert last.finish_reason and last.usage.prompt_tokens == len(p["prompt_token_ids"])
    assert last.usage.completion_tokens == len(p["greedy_token_ids"])
    assert last.usage.ttft_seconds > 0 and last.usage.tokens_per_second > 0


def test_cancel_and_deadline_release_every_stage(client, pipeline):
    stream = client.stub.Generate(client.request(prompt="Write a long story about a dragon.", max_tokens=500))
    for i, _ in enumerate(stream):
        if i == 5:
            stream.cancel()
            break
    assert wait_released(pipeline) == [0, 0, 0, 0]
    with pytest.raises(grpc.RpcError) as e:
        for _ in client.stream(prompt="Write a long story about a cat.", max_tokens=500, timeout=0.3):
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_coordinator_validation_errors(client, pipeline):
    cases = [
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", top_p=1.5), "top_p"),
        (dict(prompt="x " * 1100, max_tokens=10), "1024"),
        (dict(token_ids=[1, 10**6]), "[0, 49152)"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(**kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert needle in e.value.details(), e.value.details()
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_stages_hold_their_weights_on_huge_pages(pipeline):
    if waits_and_pages()["thp"] in (None, "never"):
        pytest.skip("transparent huge pages are off on this host")
    for s in pipeline.stages:  # serve's stages: glibc's malloc madvises its big blocks (launcher.HUGE_PAGES)
        assert huge_page_bytes(s.proc.pid) >= 2 << 20, f"{s.name}: no anonymous memory on huge pages"


def forward(stub, sid: str, position: int, data: np.ndarray, route: list[str], num_tokens: int = 0):
    req = stage_pb2.ForwardRequest(route=route)
    e = req.entries.add(session_id=sid, position=position, num_tokens=num_tokens or len(data))
    to_proto(data, e.input)
    e.logits.top_k = 1
    return stub.Forward(req, timeout=10)


def expect(code: grpc.StatusCode, fn, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    for n in needles:
        assert n in e.value.details(), e.value.details()


def test_stage_validation_errors_touch_nothing(pipeline):
    s1, s2 = stage_stubs(pipeline)[:2]
    route = [s.address for s in pipeline.stages[1:]]
    ids = np.array([1, 2, 3], np.int32)
    forward(s1, "keep", 0, ids, route)  # a healthy session that must survive every bad call below
    inv = grpc.StatusCode.INVALID_ARGUMENT
    expect(inv, lambda: forward(s1, "x", 0, ids.astype(np.float32), route), "int32 token ids")
    expect(inv, lambda: forward(s2, "x", 0, np.zeros((2, 7), np.float32), route[1:]), "[n, 576]")
    expect(inv, lambda: forward(s1, "x", 1020, np.arange(10, dtype=np.int32), route), "outside the context")
    expect(inv, lambda: forward(s1, "x", 0, np.arange(200, dtype=np.int32), route), "1 to 128 tokens")
    expect(inv, lambda: forward(s1, "keep", 7, ids, route), "at position 3")
    expect(inv, lambda: forward(s1, "x", 0, ids, []), "route is empty")
    expect(inv, lambda: forward(s1, "keep", 0, ids, route), "already exists")
    bad = stage_pb2.ForwardRequest(route=route)
    bad.entries.add(session_id="x", position=0, num_tokens=3).input.CopyFrom(
        tensor_pb2.Tensor(dtype=tensor_pb2.INT32, shape=[3], data=b"\0" * 5)
    )
    expect(inv, lambda: s1.Forward(bad), "entries[0].input", "5 bytes")
    scalar = stage_pb2.ForwardRequest(route=route)  # no row dimension: the runtime's shape check, not a crash
    to_proto(np.array(4, np.int32), scalar.entries.add(session_id="x", position=0, num_tokens=1).input)
    expect(inv, lambda: s1.Forward(scalar), "token ids of shape [n]")
    expect(grpc.StatusCode.NOT_FOUND, lambda: forward(s1, "ghost", 3, ids, route), "ghost")
    r = forward(s1, "keep", 3, np.array([4], np.int32), route)  # still intact, continues at position 3
    assert r.results[0].token_ids.shape == [1]
    assert s1.Release(stage_pb2.ReleaseRequest(session_id="keep", route=route)).released
    expect(grpc.StatusCode.NOT_FOUND, lambda: forward(s1, "keep", 4, ids, route), "keep")
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_bad_entry_in_a_batch_fails_alone(pipeline):
    """Two sessions' token steps in one Forward: the unknown one fails with its own code, the other runs."""
    s1 = stage_stubs(pipeline)[0]
    route = [s.address for s in pipeline.stages[1:]]
    forward(s1, "live", 0, np.array([1, 2, 3], np.int32), route)
    req = stage_pb2.ForwardRequest(route=route)
    for sid in ("live", "ghost"):
        e = req.entries.add(session_id=sid, position=3, num_tokens=1)
        to_proto(np.array([4], np.int32), e.input)
        e.logits.top_k = 1
    results = {r.session_id: r for r in s1.Forward(req, timeout=10).results}  # failed here first, then the rest
    live, ghost = results["live"], results["ghost"]
    assert live.code == 0 and live.token_ids.shape == [1]
    assert ghost.code == grpc.StatusCode.NOT_FOUND.value[0] and "ghost" in ghost.message
    forward(s1, "live", 4, np.array([5], np.int32), route)  # the live session went on to position 4
    s1.Release(stage_pb2.ReleaseRequest(session_id="live", route=route))
    assert wait_released(pipeline) == [0, 0, 0, 0]


def test_kv_capacity_exhausted_then_recovers(pipeline):
    s1 = stage_stubs(pipeline)[0]
    route = [s.address for s in pipeline.stages[1:]]
    ids = np.array([1, 2], np.int32)
    for i in range(KV_CAPACITY):
        forward(s1, f"full-{i}", 0, ids, route)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: forward(s1, "one-more", 0, ids, route), "retry later")
    assert sessions_in_use(pipeline) == [KV_CAPACITY] * 4
    assert kv_gauges(pipeline) == [(KV_CAPACITY, 1.0)] * 4
    for i in range(KV_CAPACITY):
        s1.Release(stage_pb2.ReleaseRequest(session_id=f"full-{i}", route=route))
    assert wait_released(pipeline) == [0, 0, 0, 0]
    assert kv_gauges(pipeline) == [(0, 0.0)] * 4
    forward(s1, "one-more", 0, ids, route)
    s1.Release(stage_pb2.ReleaseRequest(session_id="one-more", route=route))


def scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("stage", "replica"))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def kv_gauges(pipeline) -> list[tuple[float, float]]:
    """Each stage's splitllm_stage_sessions_active and kv_cache_usage_ratio, as scraped."""
    got = [scrape(s.metrics_port) for s in pipeline.stages]
    return [(m["splitllm_stage_sessions_active{}"], m["splitllm_stage_kv_cache_usage_ratio{}"]) for m in got]


def test_metrics_move_by_the_right_amounts(client, pipeline, reference):
    ports = [s.metrics_port for s in pipeline.services]
    before = [scrape(p) for p in ports]
    prompt = reference["prompts"][1]
    out = client.generate(prompt=prompt["prompt"], max_tokens=30)
    time.sleep(0.2)
    after = [scrape(p) for p in ports]
    co_b, co_a = before[-1], after[-1]

    def moved(name: str) -> float:
        return co_a[name] - co_b[name]

    n = len(out.token_ids)
    assert moved("splitllm_requests_total{status=ok}") == 1
    assert moved("splitllm_generated_tokens_total{}") == n
    assert moved("splitllm_prompt_tokens_total{}") == len(prompt["prompt_token_ids"])
    assert moved("splitllm_time_to_first_token_seconds_count{}") == 1
    assert moved("splitllm_request_duration_seconds_count{}") == 1
    assert moved("splitllm_finish_reason_total{reason=stop}") == 1
    prompt_len = len(prompt["prompt_token_ids"])
    spread = not pipeline.one_stage_at_a_time()  # 1-thread stages on 2+ cores: chunks overlap across stages
    chunks = -(-prompt_len // prefill_chunk(prompt_len, client.model_info().prefill_length, 4, spread))
    assert chunks > 1 or not spread
    for b, a in zip(before[:-1], after[:-1], strict=True):
        key = "splitllm_stage_forward_seconds_count{mode=%s}"
        assert a[key % "prompt"] - b[key % "prompt"] == chunks
        assert a[key % "token"] - b[key % "token"] == n - 1  # the last sampled token is never fed back
        assert a["splitllm_stage_received_bytes_total{}"] > b["splitllm_stage_received_bytes_total{}"]
        assert any(k.startswith("splitllm_build_info") for k in a)


def test_dashboard_and_rules_query_only_exported_metrics(pipeline):
    from test_deploy_config import RAW_NAME, dashboard_exprs, rules

    exported: set[str] = set()
    for s in pipeline.services:
        exported |= {k.split("{")[0] for k in scrape(s.metrics_port)}
    queried = {n for e in [r["expr"] for r in rules()] + dashboard_exprs() for n in RAW_NAME.findall(e)}
    assert queried and queried <= exported, sorted(queried - exported)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def wait_health(address: str, status: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(address) == status:
            return True
        time.sleep(0.1)
    return False


def test_stage_death_fails_fast_and_service_recovers(client, pipeline):
    """Last in this module: kills stage 3 mid-generation, then starts it again."""
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(pipeline.coordinator.address) == SERVING
    errors: list[grpc.RpcError] = []
    started = threading.Event()

    def long_generation() -> None:
        try:
            for _ in client.stream(prompt="Write a long story about a lighthouse.", max_tokens=900):
                started.set()
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=long_generation)
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    pipeline.stages[2].proc.kill()
    t.join(timeout=10)
    assert not t.is_alive() and time.monotonic() - t0 < 10
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
    assert wait_health(pipeline.coordinator.address, NOT_SERVING)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt="hi", max_tokens=3, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    pipeline.restart_stage(2)
    assert wait_health(pipeline.coordinator.address, SERVING)
    assert client.generate(prompt="what is 2+3?", max_tokens=30).text == "2 + 3 = 5"
    assert wait_released(pipeline) == [0, 0, 0, 0]
