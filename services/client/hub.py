"""`splitllm hub compile|profile`: the qnn stage graphs on Qualcomm AI Hub, through the qai-hub client.

Qualcomm's LLM flow: each stage's prompt (pp) and token (tg) graphs are compiled to QNN DLCs, then
linked into one weight-shared context binary (DIR/hub/stage<k>.bin); a profile job runs one graph of
it, picked by name. The token is qai-hub's own configuration; nothing here stores one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from splitllm.services.common.manifest import (
    MANIFEST_FILE,
    MODES,
    GraphSpec,
    ManifestError,
    load_manifest,
    sha256_file,
)

HUB_DIR = "hub"
JOBS_FILE = "jobs.json"
HUB_DTYPES = ("float32", "float16", "int64", "int32", "int16", "int8", "uint16", "uint8", "bool")
TOKEN_HELP = (
    "sign in at https://aihub.qualcomm.com, copy the API token from your Account page, then run "
    "`qai-hub configure --api_token <token>` (writes ~/.qai_hub/client.ini) or set QAIHUB_CLIENT_INI to such a file"
)
UNIT_ORDER = {"NPU": 0, "GPU": 1, "CPU": 2}
NETWORK_HELP = "`splitllm hub` needs network access to the Qualcomm AI Hub cloud"


class HubError(ValueError):
    """One line for the user (the CLI exits with code 2)."""


@dataclass(frozen=True)
class StageJobSpec:
    stage: int  # 1-based
    mode: str  # pp | tg
    name: str  # job name on AI Hub
    graph: str  # graph name inside the stage's context binary (Genie's ar<tokens>_cl<context> convention)
    model: Path  # what is uploaded: the .onnx file, or a folder holding model.onnx + model.data
    input_specs: dict[str, tuple[tuple[int, ...], str]]
    compile_options: str
    profile_options: str
    asset: Path  # the stage's linked context binary (both graphs)


@dataclass(frozen=True)
class ProfileRow:
    stage: int
    mode: str
    graph: str
    device: str
    inference_ms: float
    memory_mb: tuple[int, int] | None
    compute_units: dict[str, int]
    job_id: str


def job_specs(artifacts: str | Path, target: str = "qnn", stages: list[int] | None = None) -> list[StageJobSpec]:
    """Per stage and mode, what to submit; stages the upload folders under DIR/hub/upload. No network."""
    root = Path(artifacts)
    manifest, _ = load_manifest(root, verify=[])
    n = manifest.num_stages
    chosen = stages or list(range(1, n + 1))
    if bad := [k for k in chosen if not 1 <= k <= n]:
        raise HubError(f"--stages {','.join(map(str, bad))}: the artifact has {n} stages (allowed: 1 to {n})")
    try:
        graphs = {(k, mode): manifest.stages[k - 1].graph(target, mode) for k in chosen for mode in MODES}
    except ManifestError as e:
        raise HubError(f"{e}: AI Hub compiles the graphs of `splitllm export --target {target}`") from None
    load_manifest(root, verify=sorted({f for g in graphs.values() for f in (g.file, g.weights) if f}))  # the uploads
    specs = []
    for (k, mode), g in graphs.items():
        kind = "prompt" if mode == "pp" else "token"
        graph = f"{kind}_ar{g.max_tokens}_cl{manifest.context_length}_{k}_of_{n}"
        inputs = _input_specs(g, f"stage {k} {mode}")
        options = f"--target_runtime qnn_dlc --qnn_options context_enable_graphs={graph}"
        if g.quant_params:  # QDQ graph: keep its quantized I/O instead of float at the edges
            options += " --quantize_io"
        if any(dtype == "int64" for _, dtype in inputs.values()):
            options += " --truncate_64bit_io"
        specs.append(
            StageJobSpec(
                stage=k,
                mode=mode,
                name=f"splitllm-stage{k}-{mode}",
                graph=graph,
                model=_upload_layout(root, g, root / HUB_DIR / "upload" / f"stage{k}.{mode}.onnx"),
                input_specs=inputs,
                compile_options=options,
                profile_options=f"--qnn_options context_enable_graphs={graph}",
                asset=root / HUB_DIR / f"stage{k}.bin",
            )
        )
    return specs


def _input_specs(g: GraphSpec, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {}
    for t in g.inputs:
        if not all(isinstance(d, int) for d in t.shape):
            raise HubError(f"{where}: input {t.name} has a dynamic shape {t.shape}; AI Hub needs static shapes")
        if t.dtype not in HUB_DTYPES:
            raise HubError(f"{where}: input {t.name} is {t.dtype} (AI Hub takes {', '.join(HUB_DTYPES)})")
        specs[t.name] = (tuple(t.shape), t.dtype)
    return specs


def _upload_layout(root: Path, g: GraphSpec, folder: Path) -> Path:
    """AI Hub takes an ONNX model with external weights as a folder of exactly one .onnx and one .data file.

    The graph is rewritten to point at model.data, a symlink to the stage's weights: qai-hub zips the content.
    (Not a hard link: onnx refuses to load external data with several links, the artifact's own file included.)
    """
    if not g.weights:
        return root / g.file
    import onnx

    model = onnx.load(root / g.file, load_external_data=False)
    for t in _tensors(model.graph):
        for entry in t.external_data:
            if entry.key == "location":
                if entry.value != g.weights:
                    raise HubError(f"{g.file} keeps weights in {entry.value}, not in {g.weights} as the manifest says")
                entry.value = "model.data"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "model.data").symlink_to(os.path.relpath(root / g.weights, folder))
    return folder


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in [a.g] if a.HasField("g") else a.graphs:
                yield from _tensors(sub)


def compile(
    artifacts: str | Path, device: str, client: Any = None, stages: list[int] | None = None, out: TextIO | None = None
) -> dict:
    """Compile and link every chosen stage for `device`; download the binaries; record DIR/hub/jobs.json."""
    specs = job_specs(artifacts, stages=stages)
    with _hub_errors():
        client, dev = _connect(client, device)
        return _compile(Path(artifacts), client, dev, specs, out or sys.stdout)


def profile(
    artifacts: str | Path, device: str, client: Any = None, stages: list[int] | None = None, out: TextIO | None = None
) -> list[ProfileRow]:
    """Profile each chosen graph on `device` (compiling stages first when their binary is missing or stale)."""
    root, out = Path(artifacts), out or sys.stdout
    specs = job_specs(root, stages=stages)
    with _hub_errors():
        client, dev = _connect(client, device)
        record = _load_record(root)
        if stale := {k for k in {s.stage for s in specs} if not _usable(root, record, dev.name, k)}:
            record = _compile(root, client, dev, [s for s in specs if s.stage in stale], out)
        models = {k: client.get_model(record["stages"][str(k)]["model_id"]) for k in {s.stage for s in specs}}
        jobs = [
            client.submit_inference_job(
                models[s.stage], dev, inputs=None, name=s.name, options=s.profile_options, profile=True
            )
            for s in specs
        ]
        rows = [_profile_row(s, dev.name, j) for s, j in zip(specs, jobs, strict=True)]
    for r in rows:
        record["stages"][str(r.stage)]["graphs"][r.mode]["profile"] = {
            k: v for k, v in asdict(r).items() if k not in ("stage", "mode", "graph")
        }
    _save_record(root, record)
    print_summary(rows, out)
    return rows


def _compile(root: Path, client: Any, dev: Any, specs: list[StageJobSpec], out: TextIO) -> dict:
    jobs = [
        client.submit_compile_job(
            model=str(s.model), device=dev, name=s.name, input_specs=s.input_specs, options=s.compile_options
        )
        for s in specs
    ]
    record = _load_record(root)
    if record.get("device") != dev.name or record.get("manifest_sha256") != _manifest_sha(root):
        record = {"device": dev.name, "manifest_sha256": _manifest_sha(root), "stages": {}}
    for k in sorted({s.stage for s in specs}):
        mine = [(s, j) for s, j in zip(specs, jobs, strict=True) if s.stage == k]
        models = [_finished(j, f"stage {k} {s.mode} compile").get_target_model() for s, j in mine]
        link = _finished(
            client.submit_link_job(models, device=dev, name=f"splitllm-stage{k}", options=""), f"stage {k} link"
        )
        target = link.get_target_model()
        mine[0][0].asset.parent.mkdir(parents=True, exist_ok=True)
        asset = Path(target.download(str(mine[0][0].asset)))  # qai-hub may append the server's extension
        record["stages"][str(k)] = {
            "asset": asset.relative_to(root).as_posix(),
            "sha256": sha256_file(asset),
            "model_id": target.model_id,
            "link_job": link.job_id,
            "graphs": {s.mode: {"graph": s.graph, "compile_job": j.job_id} for s, j in mine},
        }
        _save_record(root, record)  # after each stage, so an interrupted run keeps what it paid for
        graphs = ", ".join(s.graph for s, _ in mine)
        print(f"stage {k}: {asset} ({asset.stat().st_size / 1e6:.1f} MB; graphs {graphs}; {dev.name})", file=out)
    return record


def _finished(job: Any, what: str) -> Any:
    status = job.wait()
    if not status.success:
        raise HubError(f"{what} job {job.job_id} failed: {status.message} (see {job.url})")
    return job


def _usable(root: Path, record: dict, device: str, stage: int) -> bool:
    """Compiled for this device from this manifest, and the binary on disk is the one downloaded."""
    entry = record.get("stages", {}).get(str(stage))
    return (
        record.get("device") == device
        and record.get("manifest_sha256") == _manifest_sha(root)
        and entry is not None
        and set(entry["graphs"]) == set(MODES)
        and (root / entry["asset"]).is_file()
        and sha256_file(root / entry["asset"]) == entry["sha256"]
    )


def _profile_row(s: StageJobSpec, device: str, job: Any) -> ProfileRow:
    p = _finished(job, f"stage {s.stage} {s.mode} profile").download_profile()
    summary = p["execution_summary"]
    peak = summary.get("inference_memory_peak_range")
    units = Counter(layer.get("compute_unit", "unknown").upper() for layer in p.get("execution_detail", []))
    return ProfileRow(
        stage=s.stage,
        mode=s.mode,
        graph=s.graph,
        device=device,
        inference_ms=summary["estimated_inference_time"] / 1000,
        memory_mb=(peak[0] >> 20, peak[1] >> 20) if peak else None,
        compute_units=dict(units),
        job_id=job.job_id,
    )


def print_summary(rows: list[ProfileRow], out: TextIO) -> None:
    """The per-stage Profile Job summary, in the model card's terms."""
    table = [("stage", "graph", "device", "inference", "peak memory", "compute units", "job")]
    for r in rows:
        units = ", ".join(f"{u} {n}" for u, n in sorted(r.compute_units.items(), key=lambda x: UNIT_ORDER.get(x[0], 3)))
        memory = f"{r.memory_mb[0]} - {r.memory_mb[1]} MB" if r.memory_mb else "n/a"
        table.append((str(r.stage), r.graph, r.device, f"{r.inference_ms:.1f} ms", memory, units, r.job_id))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print("Profile Job summary (Qualcomm AI Hub)", file=out)
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    for mode, label in (("pp", "prompt processor"), ("tg", "token generator")):
        mine = [r for r in rows if r.mode == mode]
        if mine:
            total = sum(r.inference_ms for r in mine)
            print(f"{label}: {total:.1f} ms over {len(mine)} stage(s), sum of the graphs without transport", file=out)


def _load_record(root: Path) -> dict:
    path = root / HUB_DIR / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _save_record(root: Path, record: dict) -> None:
    path = root / HUB_DIR / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True))


def _manifest_sha(root: Path) -> str:
    return sha256_file(root / MANIFEST_FILE)


def _connect(client: Any, device: str) -> tuple[Any, Any]:
    """The client (qai-hub's own, by default) and the device; this first call fails fast without token or network."""
    if client is None:
        try:
            import qai_hub
        except ImportError:
            raise HubError("qai-hub is not installed: pip install 'splitllm[qnn]'") from None
        client = qai_hub.Client()
    with _few_retries():
        devices = client.get_devices(name=device)
    if not devices:
        raise HubError(f"Qualcomm AI Hub has no device named {device!r} (`qai-hub list-devices` lists them)")
    return client, devices[-1]


@contextlib.contextmanager
def _few_retries(retries: int = 1) -> Iterator[None]:
    """qai-hub retries a failing request 6 times with backoff (47 s offline); uploads and polling keep that."""
    try:
        from qai_hub.util import session
    except ImportError:
        yield
        return
    saved, session.MAX_RETRIES = session.MAX_RETRIES, retries
    try:
        yield
    finally:
        session.MAX_RETRIES = saved


@contextlib.contextmanager
def _hub_errors() -> Iterator[None]:
    """qai-hub's errors (multi-line text boxes) become one line that says what to do."""
    try:
        yield
    except Exception as e:
        if type(e).__module__.split(".")[0] != "qai_hub":
            raise
        raise HubError(_explain(e)) from None


def _explain(e: Exception) -> str:
    text = str(e)
    flat = " ".join(w for w in text.split() if w.strip("|│┌┐└┘─"))
    kind = type(e).__name__
    if kind == "UserError" and ("configuration" in text or "token is missing" in text):
        where = os.environ.get("QAIHUB_CLIENT_INI") or "~/.qai_hub/client.ini"
        return f"no Qualcomm AI Hub API token is configured ({where}): {TOKEN_HELP}; {NETWORK_HELP}"
    if kind == "UserError" and "authenticate" in text:
        return f"Qualcomm AI Hub refused the API token (bad or expired): {TOKEN_HELP}"
    if kind == "InternalError" and any(w in text for w in ("connect", "Timeout", "unavailable")):
        return f"could not reach Qualcomm AI Hub ({flat}): {NETWORK_HELP}; check the connection or proxy and retry"
    return f"Qualcomm AI Hub: {flat}"
