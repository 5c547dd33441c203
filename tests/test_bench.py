"""`splitllm bench` and the bench tools: statistics, targets, table (no timing here), and the tools that run graphs."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import running

from splitllm.bench import report
from splitllm.bench.suite import REFERENCE, first_divergence, greedy_note, oversubscribed, reference_perplexity


def fig(median: float) -> dict:
    return report.summarize([median * 0.9, median, median * 1.2])


def results(gen: dict[str, float], tpot_ms: dict[str, float]) -> dict:
    out = {}
    for r in gen:
        figures = {k: fig(1.0) for k in report.FIGURES}
        figures |= {"gen_tps": fig(gen[r]), "tpot": fig(tpot_ms[r] / 1e3), "ttft_32": fig(0.1),
                    "prompt_tps_1024": fig(300.0)}
        out[r] = {"figures": figures, "rss": {"total": 200e6}, "rss_streams": {"total": 300e6}, "pss": 190e6,
                  "perplexity": {"second_half": 13.5, "all_tokens": 14.5}}
    out["pipeline"]["rss"] = {f"stage {i}": 100e6 for i in (1, 2, 3, 4)} | {"coordinator": 80e6, "total": 480e6}
    out["pipeline"].pop("perplexity")
    return out


def test_summarize_min_median_max():
    s = report.summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["min"], s["median"], s["max"]) == (1.0, 2.5, 10.0)
    assert s["samples"] == [3.0, 1.0, 2.0, 10.0]


def test_targets_ratios_and_verdicts():
    r = results({"pipeline": 150.0, "chain": 150.0, "llamacpp": 100.0}, {"pipeline": 7.0, "chain": 6.0, "llamacpp": 10})
    r["llamacpp"]["figures"]["prompt_tps_1024"] = fig(100.0)
    r["chain"]["perplexity"]["second_half"] = 13.5 * 1.02
    t = {x["name"]: x for x in report.evaluate(r)}
    gen = t["generation tok/s, pipeline / llama.cpp"]
    assert gen["value"] == pytest.approx(1.5) and gen["met"] is True and gen["shown"] == "1.50x"
    assert t["generation tok/s, chain / llama.cpp"]["met"] is False  # 1.5 < 1.6
    assert t["prompt tok/s at 1024, pipeline / llama.cpp"]["value"] == pytest.approx(3.0)
    assert t["TTFT 32 tokens, pipeline / llama.cpp"]["met"] is False  # same TTFT: ratio 1
    overhead = t["pipeline overhead per token (TPOT - chain's)"]
    assert overhead["value"] == pytest.approx(1.0) and overhead["met"] is True and overhead["shown"] == "1.00 ms"
    ppl = t["perplexity, splitllm vs llama.cpp"]
    assert ppl["value"] == pytest.approx(2.0) and ppl["met"] is False
    assert t["peak RSS, pipeline (5 processes) / llama.cpp"]["value"] == pytest.approx(2.4)


def test_overhead_by_repetition_pairs_the_pipeline_and_the_chain_of_each_repetition():
    r = results({"pipeline": 150.0, "chain": 150.0}, {"pipeline": 7.0, "chain": 6.0})
    r["pipeline"]["figures"]["tpot"] = report.summarize([0.007, 0.009, 0.006])
    r["chain"]["figures"]["tpot"] = report.summarize([0.006, 0.005, 0.006])
    s = report.overhead_by_repetition(r)
    assert s["samples"] == pytest.approx([1.0, 4.0, 0.0]) and s["median"] == pytest.approx(1.0)
    assert report.overhead_ms(r) == pytest.approx(1.0)  # medians 7 and 6 ms: the same here, not in general
    r["chain"]["figures"]["tpot"] = report.summarize([0.006, 0.005])  # not one sample a repetition each
    assert report.overhead_by_repetition(r) is None
    assert report.overhead_by_repetition({"pipeline": r["pipeline"]}) is None


def test_targets_without_llamacpp_are_not_applicable():
    r = results({"pipeline": 150.0, "chain": 160.0, "llamacpp": 1.0}, {"pipeline": 8.0, "chain": 6.0, "llamacpp": 1})
    r["llamacpp"] = {"perplexity": {"second_half": 13.5, "all_tokens": 14.5}}  # quoted from the reference
    t = {x["name"]: x for x in report.evaluate(r)}
    assert t["generation tok/s, pipeline / llama.cpp"]["met"] is None
    assert t["generation tok/s, pipeline / llama.cpp"]["shown"] == "n/a"
    assert t["pipeline overhead per token (TPOT - chain's)"]["met"] is False  # 2 ms
    assert t["perplexity, splitllm vs llama.cpp"]["met"] is True


def test_ratio_targets_also_against_the_other_llamacpp_but_judged_against_the_one_that_waits_as_the_stages():
    r = results({"pipeline": 150.0, "chain": 150.0, "llamacpp": 100.0, "llamacpp_spin": 300.0},
                {"pipeline": 7.0, "chain": 6.0, "llamacpp": 10, "llamacpp_spin": 3})
    r["llamacpp_spin"]["rss"] = {"total": 100e6}
    t = {x["name"]: x for x in report.evaluate(r)}
    gen = t["generation tok/s, pipeline / llama.cpp"]
    assert gen["met"] is True and gen["vs_other"] == pytest.approx(0.5) and gen["vs_other_shown"] == "0.50x"
    rss = t["peak RSS, pipeline (5 processes) / llama.cpp"]
    assert rss["value"] == pytest.approx(2.4) and "vs_other" not in rss  # one process, however its threads wait
    assert "vs_other" not in t["pipeline overhead per token (TPOT - chain's)"]
    text = report.render(r, list(t.values()))
    assert text.splitlines()[0].endswith("llama.cpp  llama.cpp, threads spin")
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines["target"].endswith("met   vs llama.cpp, threads spin")
    assert lines["generation tok/s, pipeline / llama.cpp"].endswith("1.50x  yes     0.50x")
    assert lines["peak RSS, pipeline (5 processes) / llama.cpp"].endswith("2.40x  yes         -")


def test_stages_that_spin_are_compared_with_spinning_llamacpp_and_the_sleeping_one_is_the_reference(monkeypatch):
    r = results({"pipeline": 150.0, "chain": 150.0, "llamacpp": 100.0, "llamacpp_sleep": 50.0},
                {"pipeline": 7.0, "chain": 6.0, "llamacpp": 10, "llamacpp_sleep": 20})
    t = report.evaluate(r)
    assert t[0]["vs_other"] == pytest.approx(3.0) and t[0]["other"] == "llama.cpp, threads sleep"
    assert report.render(r, t).splitlines()[0].endswith("llama.cpp  llama.cpp, threads sleep")


def test_table_shows_figures_memory_and_targets():
    r = results({"pipeline": 150.0, "chain": 155.0, "llamacpp": 100.0}, {"pipeline": 7.0, "chain": 6.0, "llamacpp": 10})
    text = report.render(r, report.evaluate(r), ["a note"])
    assert "generation tok/s [tok/s]" in text and "135.0 / 150.0 / 180.0" in text
    assert "peak RSS stage 3, one stream [MB]" in text and "peak RSS total, after streams [MB]" in text
    assert text.index("peak RSS coordinator") < text.index("peak RSS total, one stream")
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines["PSS total (shared pages once), one stream [MB]"].split()[-3:] == ["190"] * 3
    assert lines["generation tok/s, pipeline / llama.cpp"].endswith("1.50x  yes")
    assert lines["generation tok/s, chain / llama.cpp"].endswith("NO")
    assert text.endswith("note: a note")


def test_reference_perplexity_is_the_geometric_mean_of_equal_chunks():
    ref = json.loads((REFERENCE / "llamacpp_perplexity.json").read_text())
    p = reference_perplexity(4)
    assert p["second_half"] == pytest.approx(ref["ppl_llama_perplexity_style_second_half"], rel=1e-3)
    assert p["all_tokens"] == pytest.approx(ref["ppl_all_tokens_in_windows"], rel=1e-3)
    assert reference_perplexity(1)["second_half"] == pytest.approx(ref["per_chunk"][0]["ppl_second_half"])


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1


def test_greedy_note_says_how_near_a_tie_the_first_difference_was():
    assert greedy_note("chain", 128, None) == "chain: greedy 128 tokens identical to llama.cpp's"
    assert greedy_note("pipeline", 128, 1, 0.0172) == ("pipeline: greedy 128 tokens first differ from llama.cpp's at "
                                                       "token 1, where llama.cpp's two best logits are 0.017 apart")
    assert greedy_note("chain", 64, 3).endswith("at token 3")


def test_oversubscription_warning(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert oversubscribed(0.05) is None
    assert "other processes took 40% of the 2 cores during the run" in oversubscribed(0.4)


def test_cpu_time_of_our_tree_leaves_out_other_processes():
    """A child that burns 0.5 s of CPU is ours; a loop whose parent has exited (reparented away) is not, though the
    machine was busy for it. Loops count their own CPU time, so a loaded machine only slows the test down."""
    import subprocess
    import sys
    import time

    from splitllm.bench.machine import busy_cpu_seconds, tree_cpu_seconds

    burn = "import time\nwhile time.process_time() < 0.5: pass"
    before = tree_cpu_seconds()
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert tree_cpu_seconds() - before >= 0.45

    before, busy = tree_cpu_seconds(), busy_cpu_seconds()
    starter = f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {burn!r}]).pid)"
    orphan = int(subprocess.run([sys.executable, "-c", starter], check=True, capture_output=True, text=True).stdout)
    deadline = time.monotonic() + 60
    while running(orphan) and time.monotonic() < deadline:  # until it has exited (a zombie, if nobody reaps orphans)
        time.sleep(0.05)
    assert busy_cpu_seconds() - busy >= 0.45
    assert tree_cpu_seconds() - before < 0.3  # the starter's own start-up only


def test_hop_trace_lines_up_events_across_processes(tmp_path):
    import os
    import subprocess
    import sys

    from splitllm.bench.hop_trace import analyse, load

    code = "from splitllm.services.common import trace; trace.event(7, 'received'); trace.event(7, 'run')"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPLITLLM_TRACE_DIR": str(tmp_path)}, check=True)
    assert [e[2] for e in load(tmp_path)[7]] == ["received", "run"]

    coordinator, stage = 1, 2
    steps = {}
    for s in range(1, 11):  # a decode step every 1000 us: 100 us out, 600 us compute, 200 us back, 100 us sampling
        t = s * 1000
        steps[s] = [(t, coordinator, "submitted"), (t + 10, coordinator, "sent"), (t + 100, stage, "received"),
                    (t + 120, stage, "run"), (t + 720, stage, "ran"), (t + 740, stage, "handed_off"),
                    (t + 750, stage, "answered"), (t + 880, coordinator, "answer_in"),
                    (t + 900, coordinator, "answer_taken")]
    steps = {s: [(ns * 1000, pid, name) for ns, pid, name in e] for s, e in steps.items()}
    result = analyse(steps)
    assert result["matched"] == result["steps"] == 6
    assert result["by_kind_us"] == pytest.approx(
        {"hand-off": 20, "transport": 220, "python": 40, "compute": 600, "coordinator": 120})
    assert result["median_step_interval_us"] == pytest.approx(1000)


def test_hop_trace_lines_up_each_ttft_call_from_the_client():
    from splitllm.bench.hop_trace import analyse_calls

    coordinator, stage = 1, 2
    steps, calls = {}, []
    for s in range(1, 6):  # a call every 10 ms: 900 us to the step, 5 ms compute, 700 us back to the client
        t = s * 10_000
        steps[s] = [(t + 900, coordinator, "submitted"), (t + 950, coordinator, "sent"),
                    (t + 1200, stage, "received"), (t + 1250, stage, "run"), (t + 6250, stage, "ran"),
                    (t + 6400, stage, "handed_off"), (t + 6450, stage, "answered"),
                    (t + 6700, coordinator, "answer_in"), (t + 6800, coordinator, "answer_taken")]
        calls.append((t * 1000, (t + 7500) * 1000))
    steps[99] = [(3_000_000, stage, "run")]  # outside every call: left out
    steps = {s: [(ns * 1000, pid, name) for ns, pid, name in e] for s, e in steps.items()}
    result = analyse_calls(steps, calls)
    assert result["matched"] == result["calls"] == 5 and result["median_ttft_us"] == pytest.approx(7500)
    assert result["by_kind_us"] == pytest.approx({"call": 900, "hand-off": 100, "transport": 500, "python": 200,
                                                  "compute": 5000, "coordinator": 100, "reply": 700})
    assert result["rows"][0]["from"] == "client:call" and result["rows"][-1]["to"] == "client:got"


def test_machine_names_the_cpu_its_kernel_flags_and_versions(monkeypatch, tmp_path):
    from splitllm.bench import machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    m = machine.describe()
    assert m["cpu"] == "Test CPU 9000" and m["isa"] == ["avx2", "avx512f", "avx512_vnni", "amx_int8"]
    assert m["onnxruntime"] == __import__("onnxruntime").__version__ and m["cores"] >= 1
    line = machine.summary(m)
    assert line.startswith("Test CPU 9000, ") and "avx512_vnni amx_int8" in line and "onnxruntime" in line
    json.dumps(m)  # goes into bench.json as it is


def test_machine_names_the_thp_mode_and_how_idle_cpus_wait(monkeypatch, tmp_path):
    from splitllm.bench import machine

    monkeypatch.setattr(machine, "SYS", tmp_path)
    assert machine.waits_and_pages() == {"thp": None, "cpuidle": None, "guest_halt_poll_ns": None}  # not Linux
    for rel, text in (("kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n"),
                      ("devices/system/cpu/cpuidle/current_driver", "haltpoll\n"),
                      ("module/haltpoll/parameters/guest_halt_poll_ns", "0\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert machine.waits_and_pages() == {"thp": "madvise", "cpuidle": "haltpoll", "guest_halt_poll_ns": 0}
    assert machine.summary(machine.describe()).endswith("; THP madvise, cpuidle haltpoll (halt poll 0 ns)")


def test_machine_times_wake_ups_on_one_cpu_and_across_two(monkeypatch):
    import os

    from splitllm.bench import machine

    cpu = min(os.sched_getaffinity(0))
    assert machine.wake_round_trip_us(cpu, cpu, rounds=5, gap=0) > 0  # the echo process answered, and has exited
    monkeypatch.setattr(machine, "wake_round_trips", lambda: {"same_cpu": 7.2, "across_cpus": 53.4})
    assert machine.summary(machine.describe(measure=True)).endswith(
        ", wake-up round trip 7 us on one CPU, 53 across two")
    if len(os.sched_getaffinity(0)) >= 2:
        assert set(machine.wake_round_trips()) == {"same_cpu", "across_cpus"}


def test_llamacpp_models_load_without_extra_buffer_types_when_patched():
    from types import SimpleNamespace

    from splitllm.bench.runtimes import _without_extra_buffer_types

    bindings = SimpleNamespace(llama_model_default_params=lambda: SimpleNamespace(use_extra_bufts=True, n_gpu_layers=0))
    _without_extra_buffer_types(SimpleNamespace(llama_cpp=bindings))
    params = bindings.llama_model_default_params()
    assert params.use_extra_bufts is False and params.n_gpu_layers == 0  # the rest of the defaults stay


def test_amx_probe_runs_only_on_amx_cpus_and_reads_sigill(monkeypatch):
    import signal
    from types import SimpleNamespace

    from splitllm.bench import runtimes

    probes, exit_code = [], {"value": -signal.SIGILL}

    def fake_run(args, **_):
        probes.append(args)
        return SimpleNamespace(returncode=exit_code["value"])

    monkeypatch.setattr(runtimes.subprocess, "run", fake_run)
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert runtimes.amx_kernels_crash("m.gguf") is False and probes == []  # no AMX: nothing to try
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: {"avx512f", "amx_int8"})
    assert runtimes.amx_kernels_crash("m.gguf") is True and probes[-1][-1] == "m.gguf"
    exit_code["value"] = 0
    assert runtimes.amx_kernels_crash("m.gguf") is False  # AMX works there: llama.cpp keeps it


def run_ab_tool(tool, tmp_path, monkeypatch, *args: str) -> dict:
    """Run a bench A/B tool's main() with `args`, its JSON going to tmp_path; returns that JSON."""
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "ab.json")
    monkeypatch.setattr(sys, "argv", ["ab", *args, "--rounds", "2", "--b", "SPLITLLM_AB_SIDE=b"])
    tool.main()
    return json.loads((tmp_path / "ab.json").read_text())


def test_env_ab_runs_both_sides_in_turns(smollm2_artifacts, tmp_path, monkeypatch):
    """bench/env_ab.py: two child processes, one environment each, a sample of every figure per round."""
    from splitllm.bench import env_ab

    doc = run_ab_tool(env_ab, tmp_path, monkeypatch, "--artifacts", str(smollm2_artifacts), "--stage", "2")
    assert doc["sides"]["B"] == ["SPLITLLM_AB_SIDE=b"] and doc["what"] == "stage 2"
    for side in ("A", "B"):
        assert len(doc["samples"][side]) == 2 and all(len(s) == 4 and min(s) > 0 for s in doc["samples"][side])
    assert env_ab.environment(["A=1", "B=x=y"])["B"] == "x=y"
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        env_ab.environment(["no-equals-sign"])


def test_pipeline_ab_runs_two_pipelines_in_turns(smollm2_artifacts, tmp_path, monkeypatch):
    """bench/pipeline_ab.py: two bench runners with a pipeline each; a TTFT and a TPOT sample per side and round."""
    from splitllm.bench import pipeline_ab

    doc = run_ab_tool(pipeline_ab, tmp_path, monkeypatch, "--artifacts", str(smollm2_artifacts), "--tokens", "4")
    assert doc["sides"] == {"A": ["GLIBC_TUNABLES=glibc.malloc.hugetlb=0"], "B": ["SPLITLLM_AB_SIDE=b"]}
    for side in ("A", "B"):
        assert all(len(v) == 2 and min(v) > 0 for v in doc["samples"][side].values())
        assert doc["peak_rss_mb"][side] > 100  # five processes


def test_kernel_ab_builds_the_other_side_and_times_both(tmp_path, monkeypatch):
    """bench/kernel_ab.py: side B compiled from the C source, registered beside the package's build; both agree."""
    from pathlib import Path

    from splitllm.bench import kernel_ab
    from splitllm.services.stage import cpu_kernels

    source = str(Path(cpu_kernels.__file__).with_suffix(".c"))
    monkeypatch.setattr(kernel_ab, "RESULTS", tmp_path / "ab.json")
    monkeypatch.setattr(sys, "argv", ["ab", "--b", source, "--rows", "1,5", "--layers", "1", "--rounds", "2"])
    kernel_ab.main()
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert set(doc["rows"]) == {"1", "5"}
    assert all(r["a_ms"] > 0 and r["b_ms"] > 0 and 0 <= r["b_faster_rounds"] <= 2 for r in doc["rows"].values())


def test_attention_speed_times_both_ops_on_both_head_shapes(tmp_path, monkeypatch):
    """bench/attention_speed.py: our Attention and GroupQueryAttention, each case, each model's heads."""
    from splitllm.bench import attention_speed

    monkeypatch.setattr(attention_speed, "RESULTS", tmp_path / "attn.json")
    monkeypatch.setattr(sys, "argv", ["attn", "--rounds", "2", "--context", "1024"])
    attention_speed.main()
    doc = json.loads((tmp_path / "attn.json").read_text())
    assert set(doc["results"]) == {"smollm2", "llama3-8b"}
    for cases in doc["results"].values():
        assert set(cases) == {"decode at 160", "decode at 600", "decode at 1000", "1024-token prompt"}
        assert all(c["ours_us"] > 0 and c["gqa_us"] > 0 for c in cases.values())
