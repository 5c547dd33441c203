"""The pure side of `splitllm bench`: statistics, targets, the terminal table and the chart."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RUNTIMES = {"pipeline": "splitllm pipeline", "chain": "in-process chain", "llamacpp": "llama.cpp",
            "llamacpp_spin": "llama.cpp, threads spin", "llamacpp_sleep": "llama.cpp, threads sleep"}
# The targets compare with "llamacpp", whose threads wait as the stages' do; the other way is a reference column.
OTHER_LLAMACPP = ("llamacpp_spin", "llamacpp_sleep")

# generate_sampled's request: a chat client's usual setting, whose top_p needs the whole vocabulary each row
SAMPLED = {"temperature": 0.7, "top_p": 0.9}
SAMPLED_SEED = 1
SAMPLED_LABEL = ", ".join(f"{k} {v}" for k, v in SAMPLED.items())

# key -> (label, unit, scale from the stored SI value to the shown unit)
FIGURES: dict[str, tuple[str, str, float]] = {
    "ttft_32": ("TTFT, 32-token prompt", "ms", 1e3),
    "ttft_128": ("TTFT, 128-token prompt", "ms", 1e3),
    "ttft_1024": ("TTFT, 1024-token prompt", "ms", 1e3),
    "prompt_tps_128": ("prompt tok/s, 128 tokens", "tok/s", 1),
    "prompt_tps_1024": ("prompt tok/s, 1024 tokens", "tok/s", 1),
    "gen_tps": ("generation tok/s", "tok/s", 1),
    "tpot": ("time per output token", "ms", 1e3),
    "gen_tps_1": ("generation tok/s, one token a step", "tok/s", 1),
    "tpot_1": ("time per output token, one token a step", "ms", 1e3),
    "gen_tps_sampled": (f"generation tok/s, sampled ({SAMPLED_LABEL})", "tok/s", 1),
    "tpot_sampled": ("time per output token, sampled", "ms", 1e3),
    "streams_1": ("aggregate tok/s, 1 stream", "tok/s", 1),
    "streams_4": ("aggregate tok/s, 4 streams", "tok/s", 1),
    "streams_16": ("aggregate tok/s, 16 streams", "tok/s", 1),
}


def summarize(samples: list[float]) -> dict:
    """min / median / max of the measured repetitions (warm-up already dropped)."""
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "samples": samples}


def median(results: dict, runtime: str, key: str) -> float | None:
    fig = results.get(runtime, {}).get("figures", {}).get(key)
    return fig["median"] if fig else None


def rss_total(results: dict, runtime: str) -> float | None:
    rss = results.get(runtime, {}).get("rss")
    return rss["total"] if rss else None


def ppl(results: dict, runtime: str) -> float | None:
    p = results.get(runtime, {}).get("perplexity")
    return p["second_half"] if p else None


@dataclass(frozen=True)
class Target:
    name: str
    rule: str  # shown as is
    measure: Callable[[dict, str], float | None]  # from the results of every runtime and the llama.cpp to compare
    ok: Callable[[float], bool]
    fmt: str = "{:.2f}x"
    per_llamacpp: bool = True  # a ratio to llama.cpp: also shown against the one that waits the other way


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def vs_llamacpp(runtime: str, key: str) -> Callable[[dict, str], float | None]:
    return lambda r, ref: ratio(median(r, runtime, key), median(r, ref, key))


def overhead_ms(r: dict, _: str = "", key: str = "tpot") -> float | None:
    """TPOT of the gRPC pipeline minus TPOT of the same graphs in one process (`key`: tpot_1, one token a step)."""
    a, b = median(r, "pipeline", key), median(r, "chain", key)
    return (a - b) * 1e3 if a is not None and b is not None else None


def overhead_by_repetition(r: dict, key: str = "tpot") -> dict | None:
    """The pipeline's TPOT minus the chain's within each repetition (they take turns in it), summarized: the spread
    that the target's difference of two medians does not show. None unless both have one sample a repetition."""
    a, b = (r.get(x, {}).get("figures", {}).get(key) for x in ("pipeline", "chain"))
    if not a or not b or len(a["samples"]) != len(b["samples"]):
        return None
    return summarize([(x - y) * 1e3 for x, y in zip(a["samples"], b["samples"], strict=True)])


def ppl_delta_percent(r: dict, _: str = "") -> float | None:
    q = ratio(ppl(r, "chain"), ppl(r, "llamacpp"))
    return 100 * (q - 1) if q is not None else None


TARGETS = [
    Target("generation tok/s, pipeline / llama.cpp", ">= 1.4x", vs_llamacpp("pipeline", "gen_tps"),
           lambda x: x >= 1.4),
    Target("generation tok/s, chain / llama.cpp", ">= 1.6x", vs_llamacpp("chain", "gen_tps"), lambda x: x >= 1.6),
    Target("prompt tok/s at 1024, pipeline / llama.cpp", ">= 2.6x", vs_llamacpp("pipeline", "prompt_tps_1024"),
           lambda x: x >= 2.6),
    Target("TTFT 32 tokens, pipeline / llama.cpp", "<= 0.5x", vs_llamacpp("pipeline", "ttft_32"), lambda x: x <= 0.5),
    Target("pipeline overhead per token (TPOT - chain's)", "<= 1.5 ms", overhead_ms, lambda x: x <= 1.5, "{:.2f} ms",
           per_llamacpp=False),
    Target("perplexity, splitllm vs llama.cpp", "within 1 %", ppl_delta_percent, lambda x: abs(x) <= 1.0,
           "{:+.2f} %", per_llamacpp=False),
    Target("peak RSS, pipeline (5 processes) / llama.cpp", "<= 2.5x",
           lambda r, ref: ratio(rss_total(r, "pipeline"), rss_total(r, "llamacpp")), lambda x: x <= 2.5,
           per_llamacpp=False),  # one llama.cpp process, however its threads wait
]


def other_llamacpp(results: dict) -> str | None:
    return next((k for k in OTHER_LLAMACPP if results.get(k, {}).get("figures")), None)


def evaluate(results: dict) -> list[dict]:
    """Each target against llama.cpp whose threads wait as the stages' do; the ratios also against the llama.cpp
    that waits the other way when it ran (`vs_other`, never counted as met or not)."""
    out, other = [], other_llamacpp(results)
    for t in TARGETS:
        value = t.measure(results, "llamacpp")
        row = {"name": t.name, "rule": t.rule, "value": value,
               "shown": t.fmt.format(value) if value is not None else "n/a",
               "met": t.ok(value) if value is not None else None}
        if other and t.per_llamacpp and (v := t.measure(results, other)) is not None:
            row |= {"vs_other": v, "vs_other_shown": t.fmt.format(v), "other": RUNTIMES[other]}
        out.append(row)
    return out


def _cell(fig: dict | None, scale: float) -> str:
    if not fig:
        return "-"
    return " / ".join(f"{fig[k] * scale:.1f}" for k in ("min", "median", "max"))


def render(results: dict, targets: list[dict], notes: list[str] = ()) -> str:
    """The terminal table: figures per runtime (min / median / max), memory, perplexity, then the targets."""
    runtimes = [k for k in RUNTIMES if k in results]
    rows = [["", *(RUNTIMES[k] for k in runtimes)]]
    for key, (label, unit, scale) in FIGURES.items():
        rows.append([f"{label} [{unit}]", *(_cell(results[k].get("figures", {}).get(key), scale) for k in runtimes)])
    names = sorted({n for k in runtimes for n in results[k].get("rss", {})}, key=lambda n: (n == "total", n))
    for label, field, name in [*(("one stream", "rss", n) for n in names), ("after streams", "rss_streams", "total")]:
        rows.append([f"peak RSS {name}, {label} [MB]",
                     *(f"{results[k][field][name] / 1e6:.0f}" if name in results[k].get(field, {}) else "-"
                       for k in runtimes)])
    rows.append(["PSS total (shared pages once), one stream [MB]",
                 *(f"{results[k]['pss'] / 1e6:.0f}" if "pss" in results[k] else "-" for k in runtimes)])
    for key, label in (("second_half", "second half"), ("all_tokens", "all tokens")):
        rows.append([f"perplexity, {label}",
                     *(f"{results[k]['perplexity'][key]:.3f}" if results[k].get("perplexity") else "-"
                       for k in runtimes)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    other = next((t["other"] for t in targets if "other" in t), None)
    lines += ["", "target".ljust(48) + "rule".ljust(12) + "measured".rjust(10) + "  met"
              + (f"   vs {other}" if other else "")]
    for t in targets:
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        verdict = met.ljust(3) + t.get("vs_other_shown", "-").rjust(10) if other else met
        lines.append(t["name"].ljust(48) + t["rule"].ljust(12) + t["shown"].rjust(10) + "  " + verdict)
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes])


def chart(results: dict, path: Path, subtitle: str = "") -> None:
    """Bar panels per runtime: generation tok/s, TTFT of a 32-token prompt, prompt tok/s at 1024 (min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = [k for k in RUNTIMES if results.get(k, {}).get("figures")]
    panels = [("gen_tps", "generation (tokens/s, higher is better)"),
              ("ttft_32", "time to first token, 32-token prompt (ms, lower is better)"),
              ("prompt_tps_1024", "prompt processing, 1024 tokens (tokens/s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), layout="constrained")
    colors = ["#1f77b4", "#7fb3e0", "#d62728", "#f2a09f", "#f2a09f"]
    for ax, (key, title) in zip(axes, panels, strict=True):
        scale = FIGURES[key][2]
        figs = [results[k]["figures"][key] for k in runtimes]
        med = [f["median"] * scale for f in figs]
        err = [[m - f["min"] * scale for m, f in zip(med, figs, strict=True)],
               [f["max"] * scale - m for m, f in zip(med, figs, strict=True)]]
        names = [f"{RUNTIMES[k].replace(' ', chr(10), 1)}\n{m:.0f}" for k, m in zip(runtimes, med, strict=True)]
        ax.bar(names, med, yerr=err, capsize=4, color=colors[: len(runtimes)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"splitllm bench: median of the repetitions (value under each bar), whiskers min-max\n{subtitle}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
