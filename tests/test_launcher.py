"""The launcher's choices for `splitllm serve`, and that the processes it starts end with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import running

from splitllm.services.client import launcher


@pytest.mark.parametrize(("cores", "threads", "alone", "spin"),
                         [(2, 2, True, True), (2, 1, False, False), (4, 2, False, False), (1, 1, True, True),
                          (1, 2, True, False)])  # 2 threads on 1 core: a spinning thread would hold the other's core
def test_serve_spins_and_sends_one_batch_when_a_stage_takes_every_core(monkeypatch, cores, threads, alone, spin):
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: cores)
    p = launcher.Pipeline("unused", stage_threads=threads)
    assert launcher.one_stage_at_a_time(threads) is alone and p.stage_spin is spin
    assert launcher.Pipeline("unused", stage_threads=threads, stage_spin=False).stage_spin is False
    args = " ".join(p.coordinator_args("127.0.0.1:1", ["127.0.0.1:2"]))
    assert ("--prompt-chunks full" in args) is alone and ("--prompt-chunks spread" in args) is not alone
    assert ("--batches-in-flight 1" in args) is alone


def test_serve_pins_the_stages_compute_where_they_spin_on_shared_cores(monkeypatch):
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(launcher.os, "sched_getaffinity", lambda pid: {5, 3})  # a container's cpuset
    p = launcher.Pipeline("unused", stage_threads=2)
    assert p.stage_spin and p.stage_cpus == (3, 5)
    assert launcher.Pipeline("unused", stage_threads=2, stage_pin=False).stage_cpus == ()
    assert launcher.Pipeline("unused", stage_threads=2, stage_spin=False).stage_cpus == ()  # sleeping: unpinned
    assert launcher.Pipeline("unused", stage_threads=2, backend="qnn").stage_cpus == ()
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 8)  # each stage has cores of its own: unpinned
    assert launcher.Pipeline("unused", stage_threads=2).stage_cpus == ()


def test_a_stage_refuses_cpus_it_may_not_run_on():
    import argparse
    import os

    from splitllm.services.client.cli import cpu_list

    first = min(os.sched_getaffinity(0))
    assert cpu_list(str(first)) == (first,)
    for bad in ("9999", "0,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="CPU"):
            cpu_list(bad)


def test_stage_env_adds_the_huge_page_tunable_and_keeps_the_callers():
    assert launcher.stage_env({})["GLIBC_TUNABLES"] == launcher.HUGE_PAGES
    env = launcher.stage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{launcher.HUGE_PAGES}", "PATH": "/bin"}
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the caller's own choice stands
    assert launcher.stage_env(off) == off


SPAWNING_PARENT = """
import sys, time
from splitllm.services.client.launcher import spawn
child = spawn(["stage", "--artifacts", sys.argv[1], "--stage", "1", "--listen", sys.argv[2], "--threads", "1"])
print(child.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_spawned_stage_ends_when_its_parent_is_killed(tiny_artifacts):
    """A stage that `splitllm serve` (or the bench) started does not outlive it as an orphan holding its port, even
    when the parent dies by SIGKILL and cannot stop it."""
    from splitllm.bench.runtimes import free_port_block

    address = f"127.0.0.1:{free_port_block(1)}"
    parent = subprocess.Popen([sys.executable, "-c", SPAWNING_PARENT, str(tiny_artifacts), address],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        launcher.wait_serving(launcher.Service("stage 1", address, 0, parent), time.monotonic() + 60)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child)
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
