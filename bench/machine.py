"""What the bench ran on: CPU, the instruction sets that pick ONNX Runtime's and llama.cpp's kernels, caches,
memory and the runtimes' versions. The project's machines change between runs, and ratios to llama.cpp move
with the CPU (AVX2 vs AVX-512 VNNI), so every result carries its host."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
SYS = Path("/sys")  # where the kernel says how idle CPUs wait and whether memory may use huge pages
# /proc/cpuinfo flags that decide which int8 / 4-bit kernels run
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def _cache_sizes() -> dict[str, str]:
    """{'L2': '2048K', 'L3': '307200K'} for CPU 0 (the kernel's own strings)."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            if kind in ("Unified", "Data"):
                sizes[f"L{level}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return sizes


def _sys(rel: str) -> str | None:
    try:
        return (SYS / rel).read_text().strip()
    except OSError:
        return None


def waits_and_pages() -> dict:
    """The host settings that moved the pipeline's figures on the project's VM (bench/PERFORMANCE.md, the Zen 3
    host): the THP mode (the stages' weights on huge pages need madvise or always), the cpuidle driver and, for
    haltpoll, how long an idle vCPU polls before it halts (0: every wake-up of an idle vCPU goes through the
    hypervisor)."""
    thp = _sys("kernel/mm/transparent_hugepage/enabled") or ""
    poll = _sys("module/haltpoll/parameters/guest_halt_poll_ns")
    return {"thp": next((w[1:-1] for w in thp.split() if w.startswith("[")), None),
            "cpuidle": _sys("devices/system/cpu/cpuidle/current_driver"),
            "guest_halt_poll_ns": int(poll) if poll and poll.isdigit() else None}


# A process that answers every byte on one pipe with a byte on another, on one CPU, until the first pipe closes.
_ECHO = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nr, w = int(sys.argv[2]), int(sys.argv[3])\n"
         "while os.read(r, 1):\n    os.write(w, b'x')\n")


def wake_round_trip_us(cpu: int, other: int, rounds: int = 200, gap: float = 300e-6) -> float:
    """Median microseconds for a byte to go to a sleeping process on CPU `other` and back to this thread on `cpu`,
    after `gap` s idle each time (an idle vCPU has halted by then): two wake-ups. A pipeline token waits on ~15
    wake-ups of sleeping threads, a chained one on none; on the project's VM those across CPUs cost 8-10x those on
    one (bench/PERFORMANCE.md)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", _ECHO, str(other), str(r1), str(w2)], pass_fds=(r1, w2))
    os.close(r1)
    os.close(w2)
    mask = os.sched_getaffinity(0)
    times = []
    try:
        os.sched_setaffinity(0, {cpu})
        for _ in range(rounds + 20):  # the first ones wait for the child to start
            time.sleep(gap)
            t0 = time.perf_counter()
            os.write(w1, b"x")
            os.read(r2, 1)
            times.append(time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, mask)
        os.close(w1)
        child.wait()
        os.close(r2)
    return statistics.median(times[20:]) * 1e6


def wake_round_trips() -> dict[str, float] | None:
    """wake_round_trip_us on one CPU and across the first two this process may use; None with fewer than two, or
    where a process cannot be pinned (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {"same_cpu": round(wake_round_trip_us(cpus[0], cpus[0]), 1),
            "across_cpus": round(wake_round_trip_us(cpus[0], cpus[1]), 1)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(measure: bool = False) -> dict:
    """`measure`: also time wake-ups between processes (wake_round_trips, ~0.3 s)."""
    cpu = _cpuinfo()
    flags = cpu_flags()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "caches": _cache_sizes(),
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "llama_cpp_python": _version("llama_cpp_python"),
        **waits_and_pages(),
        **({"wake_us": wake_round_trips()} if measure else {}),
    }


def summary(m: dict) -> str:
    """One line for the terminal and the chart."""
    isa = " ".join(m["isa"]) or "no AVX2"
    l3 = f", L3 {m['caches']['L3']}" if "L3" in m["caches"] else ""
    llama = f", llama-cpp-python {m['llama_cpp_python']}" if m["llama_cpp_python"] else ""
    host = [f"THP {m['thp']}"] if m.get("thp") else []
    if m.get("cpuidle"):
        poll = m.get("guest_halt_poll_ns")
        host.append(f"cpuidle {m['cpuidle']}" + (f" (halt poll {poll} ns)" if poll is not None else ""))
    if wake := m.get("wake_us"):
        host.append(f"wake-up round trip {wake['same_cpu']:.0f} us on one CPU, {wake['across_cpus']:.0f} across two")
    return (f"{m['cpu']}, {m['cores']} cores ({isa}{l3}), {m['memory_gib']} GiB; "
            f"onnxruntime {m['onnxruntime']}{llama}" + (f"; {', '.join(host)}" if host else ""))


def busy_cpu_seconds() -> float:
    """CPU time the machine has been busy since boot, all cores together (/proc/stat: user, nice, system, irq,
    softirq and steal, which on a VM is time the host gave to other guests)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU time of process `root` (default: this one) and its live descendants, with the children each has waited
    for (/proc/<pid>/stat: utime, stime, cutime, cstime)."""
    root, tick = root or os.getpid(), os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        seconds[pid] = sum(int(f) for f in fields[11:15]) / tick
    total = 0.0
    for pid in seconds:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += seconds[pid]
    return total


class OutsideCpu:
    """The share of the machine's CPU that processes outside this one's tree (and other guests, as steal) took
    since construction. The load average cannot tell that: it counts the bench's own spinning threads too."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), busy_cpu_seconds(), tree_cpu_seconds()

    def share(self) -> float:
        wall = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        outside = (busy_cpu_seconds() - self.busy0) - (tree_cpu_seconds() - self.ours0)
        return max(outside, 0.0) / wall if wall > 0 else 0.0
