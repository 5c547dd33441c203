"""`splitllm hub`: job layout from the manifest, the calls made to the qai-hub client, the no-token message.

The AI Hub cloud is out of reach here, so a stand-in for the qai-hub client records the calls; it checks
uploads and input specs with qai-hub's own (offline) validation. The real client is used where no
network is needed: without a token, and against a closed local port.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from zipfile import ZipFile

import onnx
import pytest
from onnx import numpy_helper

from splitllm.export.build import ExportError, export
from splitllm.services.client import hub
from splitllm.services.client.cli import main
from splitllm.services.common.manifest import (
    MANIFEST_FILE,
    GraphSpec,
    ManifestError,
    TensorSpec,
    load_manifest,
    sha256_file,
)

qai_hub = pytest.importorskip("qai_hub")
from qai_hub.api_utils import input_shapes_to_tensor_type_list_pb  # noqa: E402
from qai_hub.client import SourceModelType, _determine_model_type, _raise_if_hub_user_error  # noqa: E402
from qai_hub.public_rest_api import APIException  # noqa: E402
from qai_hub.util.zipped_model import zip_model  # noqa: E402

C, P = 64, 16
DEVICE = "Snapdragon X Elite CRD"


def qnn_io(m, plan, t: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The NPU contract (DESIGN.md): static shapes, uint16 activations, additive mask, rotary and past KV as inputs."""
    cfg, kvh, hd = m.model, m.model.num_kv_heads, m.model.head_dim
    head = (
        TensorSpec("input_ids", "int32", [1, t])
        if plan.has_embedding
        else TensorSpec("hidden_in", "uint16", [1, t, cfg.hidden_size])
    )
    inputs = [head, TensorSpec("attention_mask", "uint16", [1, 1, t, C])]
    inputs += [TensorSpec(f"position_{f}", "uint16", [1, 1, t, hd // 2]) for f in ("cos", "sin")]
    last = (
        TensorSpec("logits", "uint16", [1, t, cfg.vocab_size])
        if plan.has_lm_head
        else TensorSpec("hidden_out", "uint16", [1, t, cfg.hidden_size])
    )
    outputs = [last]
    for i in range(plan.first_layer, plan.last_layer):
        inputs += [
            TensorSpec(f"past_key.{i}", "uint8", [kvh, 1, hd, C - t]),
            TensorSpec(f"past_value.{i}", "uint8", [kvh, 1, C - t, hd]),
        ]
        outputs += [
            TensorSpec(f"present_key.{i}", "uint8", [kvh, 1, hd, t]),
            TensorSpec(f"present_value.{i}", "uint8", [kvh, 1, t, hd]),
        ]
    return inputs, outputs


def add_qnn_graphs(root: Path) -> None:
    """Stand-in for `export --target qnn` while it is being built: per stage a pp and a tg graph file sharing the
    stage's weights file, static-shape QDQ-style specs, written through the Manifest dataclasses with checksums."""
    m, _ = load_manifest(root)
    files, stages = dict(m.files), []
    for plan in m.stages:
        cpu = plan.graph("cpu", "pp")
        graphs = {}
        for mode, t in (("pp", P), ("tg", 1)):
            name = f"stage{plan.index + 1}.qnn.{mode}.onnx"
            onnx.save(onnx.load(root / cpu.file, load_external_data=False), root / name)
            files[name] = sha256_file(root / name)
            inputs, outputs = qnn_io(m, plan, t)
            quant = {x.name: {"scale": 2.0**-12, "zero_point": 32768} for x in inputs + outputs if x.dtype != "int32"}
            graphs[mode] = GraphSpec(name, cpu.weights, t, inputs, outputs, quant)
        stages.append(replace(plan, graphs={**plan.graphs, "qnn": graphs}))
    (root / MANIFEST_FILE).write_text(replace(m, stages=stages, files=files).to_json())


@pytest.fixture(scope="module", params=["qnn-export", "stand-in"])
def qnn_built(request, tmp_path_factory, tiny_checkpoint) -> Path:
    """The artifact of `export --target qnn` (skipped while this build has none), and the stand-in manifest."""
    out = tmp_path_factory.mktemp("hub") / "art"
    if request.param == "qnn-export":
        try:
            export(tiny_checkpoint, out, stages=2, context=C, prefill=P, target="qnn")
        except ExportError as e:
            if "not available" not in str(e):
                raise
            pytest.skip(str(e))
    else:
        export(tiny_checkpoint, out, stages=2, context=C, prefill=P)
        add_qnn_graphs(out)
    return out


@pytest.fixture
def art(qnn_built, tmp_path) -> Path:
    shutil.copytree(qnn_built, tmp_path / "art")
    return tmp_path / "art"


# --- a stand-in for the qai-hub client (the cloud is the only thing out of reach) ---


@dataclass
class Status:
    success: bool = True
    message: str = ""


@dataclass
class Device:
    name: str
    os: str = "11"
    attributes: tuple = ("chipset:qualcomm-snapdragon-x-elite", "framework:qnn")


class Model:
    def __init__(self, model_id: str, payload: bytes = b"") -> None:
        self.model_id, self.payload = model_id, payload

    def download(self, filename: str) -> str:
        Path(filename).write_bytes(self.payload)
        return filename


def profile_data(tokens: int) -> dict:
    """What InferenceJob.download_profile() returns (qai-hub 0.56 layout), figures in the range of the model card."""
    us = 1_712_345 if tokens > 1 else 79_012
    return {
        "execution_summary": {
            "estimated_inference_time": us,
            "estimated_inference_peak_memory": 812 << 20,
            "first_load_time": 2_100_000,
            "first_load_peak_memory": 900 << 20,
            "warm_load_time": 150_000,
            "warm_load_peak_memory": 850 << 20,
            "compile_time": 0,
            "compile_peak_memory": 0,
            "inference_memory_peak_range": (0, 1024 << 20),
            "inference_memory_increase_range": (0, 12 << 20),
            "first_load_memory_peak_range": (30 << 20, 900 << 20),
            "all_inference_times": [us, us + 10],
        },
        "execution_detail": [
            {"name": f"op{i}", "type": "MatMul", "compute_unit": "NPU", "execution_time": 10, "execution_cycles": 9}
            for i in range(1230)
        ]
        + [{"name": "cast", "type": "Cast", "compute_unit": "CPU"}],
    }


class Job:
    def __init__(self, job_id: str, target: Model | None = None, profile: dict | None = None, ok: bool = True):
        self.job_id, self.url, self.target, self.profile, self.ok = (
            job_id,
            f"https://hub.test/jobs/{job_id}/",
            target,
            profile,
            ok,
        )

    def wait(self) -> Status:
        return Status(self.ok, "" if self.ok else "QNN converter: unsupported op")

    def get_target_model(self) -> Model | None:
        return self.target

    def download_profile(self) -> dict:
        return self.profile


class Hub:
    """Records every call; validates models and input specs with qai-hub's own offline checks."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, dict]] = []
        self.models: dict[str, Model] = {}
        self.fail = fail

    def _job(self, kind: str, **kw) -> Job:
        n = len(self.calls)
        job = Job(f"j{kind}{n}", ok=kind != self.fail, **kw)
        if job.target:
            self.models[job.target.model_id] = job.target
        return job

    def get_devices(self, name: str = "", os: str = "", attributes: list | None = None) -> list[Device]:
        self.calls.append(("get_devices", dict(name=name)))
        return [Device(name)]

    def submit_compile_job(self, model, device, name=None, input_specs=None, options=""):
        assert _determine_model_type(model) == SourceModelType.ONNX
        input_shapes_to_tensor_type_list_pb(input_specs)  # raises on a dtype or shape AI Hub does not take
        self.calls.append(
            ("compile", dict(model=model, device=device, name=name, input_specs=input_specs, options=options))
        )
        return self._job("compile", target=Model(f"mdlc{len(self.calls)}"))

    def submit_link_job(self, models, device, name=None, options=""):
        self.calls.append(("link", dict(models=models, device=device, name=name, options=options)))
        return self._job("link", target=Model(f"mbin{len(self.calls)}", f"context binary {name}".encode()))

    def get_model(self, model_id: str) -> Model:
        return self.models[model_id]

    def submit_inference_job(self, model, device, inputs=None, name=None, options="", profile=True):
        self.calls.append(
            ("profile", dict(model=model, device=device, inputs=inputs, name=name, options=options, profile=profile))
        )
        return self._job("profile", profile=profile_data(P if name.endswith("-pp") else 1))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]


# --- tests ---


def test_job_specs_follow_the_manifest(art, tmp_path):
    m, _ = load_manifest(art)
    specs = hub.job_specs(art)
    assert [(s.stage, s.mode) for s in specs] == [(1, "pp"), (1, "tg"), (2, "pp"), (2, "tg")]
    for s in specs:
        g = m.stages[s.stage - 1].graph("qnn", s.mode)
        assert list(s.input_specs.items()) == [(t.name, (tuple(t.shape), t.dtype)) for t in g.inputs]
        assert all(isinstance(d, int) for shape, _ in s.input_specs.values() for d in shape)
        input_shapes_to_tensor_type_list_pb(s.input_specs)
        assert s.name == f"splitllm-stage{s.stage}-{s.mode}"
        assert s.graph == f"{'prompt' if s.mode == 'pp' else 'token'}_ar{g.max_tokens}_cl{C}_{s.stage}_of_2"
        assert s.compile_options.startswith("--target_runtime qnn_dlc")
        assert f"--qnn_options context_enable_graphs={s.graph}" in s.compile_options
        assert ("--quantize_io" in s.compile_options) == bool(g.quant_params)
        assert s.profile_options == f"--qnn_options context_enable_graphs={s.graph}"
        assert s.asset == art / "hub" / f"stage{s.stage}.bin"
        # the upload: a folder qai-hub accepts as ONNX, the graph reading its weights from the .data beside it
        assert s.model == art / "hub" / "upload" / f"stage{s.stage}.{s.mode}.onnx"
        assert sorted(p.name for p in s.model.iterdir()) == ["model.data", "model.onnx"]
        assert _determine_model_type(str(s.model)) == SourceModelType.ONNX
        # what qai-hub uploads: its own zip of the folder (content, not links), unpacked as the server would
        with ZipFile(zip_model(str(tmp_path / "zip"), str(s.model))) as z:
            z.extractall(tmp_path / "unzipped")
        uploaded = tmp_path / "unzipped" / s.model.name
        assert (uploaded / "model.data").read_bytes() == (art / g.weights).read_bytes()
        staged = {t.name: numpy_helper.to_array(t) for t in onnx.load(uploaded / "model.onnx").graph.initializer}
        want = {t.name: numpy_helper.to_array(t) for t in onnx.load(art / g.file).graph.initializer}
        assert staged.keys() == want.keys() and all((staged[k] == want[k]).all() for k in want)
    assert len({s.graph for s in specs}) == 4
    assert [s.stage for s in hub.job_specs(art, stages=[2])] == [2, 2]


def test_job_specs_refuse_what_ai_hub_cannot_take(art):
    with pytest.raises(hub.HubError, match="dynamic shape"):
        hub.job_specs(art, target="cpu")
    with pytest.raises(hub.HubError, match=r"--stages 3: the artifact has 2 stages \(allowed: 1 to 2\)"):
        hub.job_specs(art, stages=[1, 3])
    m, _ = load_manifest(art)
    cpu_only = replace(m, stages=[replace(s, graphs={"cpu": s.graphs["cpu"]}) for s in m.stages])
    (art / MANIFEST_FILE).write_text(cpu_only.to_json())
    with pytest.raises(
        hub.HubError, match="no pp graph for target 'qnn' .*: AI Hub compiles the graphs of `splitllm export"
    ):
        hub.job_specs(art)
    (art / MANIFEST_FILE).write_text(m.to_json())
    weights = art / m.stages[0].graph("qnn", "pp").weights
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="corrupt"):
        hub.job_specs(art)


def test_compile_then_profile_drive_the_client(art, capsys):
    manifest_before = (art / MANIFEST_FILE).read_bytes()
    fake = Hub()
    specs = hub.job_specs(art)
    record = hub.compile(art, DEVICE, client=fake)

    assert fake.kinds() == ["get_devices", "compile", "compile", "compile", "compile", "link", "link"]
    assert fake.calls[0][1] == {"name": DEVICE}
    compiles = [kw for k, kw in fake.calls if k == "compile"]
    for s, kw in zip(specs, compiles, strict=True):
        assert kw == dict(
            model=str(s.model), device=Device(DEVICE), name=s.name, input_specs=s.input_specs, options=s.compile_options
        )
    links = [kw for k, kw in fake.calls if k == "link"]
    assert [kw["name"] for kw in links] == ["splitllm-stage1", "splitllm-stage2"]
    assert [[m.model_id for m in kw["models"]] for kw in links] == [["mdlc2", "mdlc3"], ["mdlc4", "mdlc5"]]

    on_disk = json.loads((art / "hub" / "jobs.json").read_text())
    assert on_disk == record
    assert record["device"] == DEVICE and record["manifest_sha256"] == sha256_file(art / MANIFEST_FILE)
    for k in ("1", "2"):
        entry = record["stages"][k]
        assert (art / entry["asset"]).read_bytes() == f"context binary splitllm-stage{k}".encode()
        assert entry["asset"] == f"hub/stage{k}.bin" and entry["sha256"] == sha256_file(art / entry["asset"])
        assert set(entry["graphs"]) == {"pp", "tg"} and entry["link_job"].startswith("jlink")
    assert (art / MANIFEST_FILE).read_bytes() == manifest_before
    load_manifest(art)  # every checksum still holds
    assert "stage 2: " in capsys.readouterr().out

    rows = hub.profile(art, DEVICE, client=fake)
    assert fake.kinds()[7:] == ["get_devices", "profile", "profile", "profile", "profile"]  # nothing recompiled
    profiles = [kw for k, kw in fake.calls if k == "profile"]
    for s, kw in zip(specs, profiles, strict=True):
        assert kw["model"].model_id == record["stages"][str(s.stage)]["model_id"]
        assert kw["inputs"] is None and kw["profile"] is True and kw["name"] == s.name
        assert kw["options"] == f"--qnn_options context_enable_graphs={s.graph}"
    assert [(r.stage, r.mode, r.inference_ms) for r in rows] == [
        (1, "pp", 1712.345),
        (1, "tg", 79.012),
        (2, "pp", 1712.345),
        (2, "tg", 79.012),
    ]
    assert rows[0].memory_mb == (0, 1024) and rows[0].compute_units == {"NPU": 1230, "CPU": 1}
    out = capsys.readouterr().out
    assert "Profile Job summary" in out
    line = next(ln for ln in out.splitlines() if "token_ar1_cl64_2_of_2" in ln)
    assert line.split()[:2] == ["2", "token_ar1_cl64_2_of_2"]
    assert DEVICE in line and "79.0 ms" in line and "0 - 1024 MB" in line and "NPU 1230, CPU 1" in line
    assert "token generator: 158.0 ms over 2 stage(s)" in out
    saved = json.loads((art / "hub" / "jobs.json").read_text())
    assert saved["stages"]["1"]["graphs"]["tg"]["profile"]["inference_ms"] == 79.012


def test_profile_compiles_first_when_the_binary_is_missing_or_stale(art, capsys):
    fake = Hub()
    hub.profile(art, DEVICE, client=fake, stages=[2])
    assert fake.kinds() == ["get_devices", "compile", "compile", "link", "profile", "profile"]
    (art / "hub" / "stage2.bin").write_bytes(b"truncated")
    hub.profile(art, DEVICE, client=fake, stages=[2])
    assert fake.kinds()[6:] == ["get_devices", "compile", "compile", "link", "profile", "profile"]


def test_a_failed_job_names_itself_in_one_line(art):
    with pytest.raises(hub.HubError) as e:
        hub.compile(art, DEVICE, client=Hub(fail="link"))
    msg = str(e.value)
    assert msg.startswith("stage 1 link job jlink") and "unsupported op" in msg and "https://hub.test/jobs/" in msg
    assert "\n" not in msg


def test_no_token_gives_the_configure_message_quickly(art, tmp_path, monkeypatch, capsys):
    """The real qai-hub client, no token configured: it fails before any connection, we say what to do."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QAIHUB_CLIENT_INI", raising=False)
    start = time.monotonic()
    with pytest.raises(hub.HubError) as e:
        hub.compile(art, DEVICE)
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert msg.startswith("no Qualcomm AI Hub API token is configured (~/.qai_hub/client.ini)")
    for part in ("https://aihub.qualcomm.com", "qai-hub configure --api_token <token>", "QAIHUB_CLIENT_INI", "network"):
        assert part in msg
    assert "\n" not in msg
    assert main(["hub", "profile", "--artifacts", str(art), "--device", DEVICE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitllm hub: error: no Qualcomm AI Hub API token") and "\n" not in err
    assert main(["hub", "compile", "--artifacts", str(art), "--device", DEVICE, "--stages", "3"]) == 2
    assert "--stages 3: the artifact has 2 stages" in capsys.readouterr().err


def test_a_token_file_without_token_or_a_refused_token_say_what_to_do(art, tmp_path, monkeypatch):
    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_url = http://127.0.0.1:9\nweb_url = http://127.0.0.1:9\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    with pytest.raises(hub.HubError, match=rf"^no Qualcomm AI Hub API token is configured \({ini}\): .*--api_token"):
        hub.compile(art, DEVICE)
    with pytest.raises(qai_hub.UserError) as e:  # what the client raises on HTTP 401
        _raise_if_hub_user_error(APIException(status_code=401))
    assert hub._explain(e.value).startswith("Qualcomm AI Hub refused the API token (bad or expired): sign in at")


def test_unreachable_hub_fails_fast(art, tmp_path, monkeypatch):
    """A token but no AI Hub (a closed local port): one line in well under qai-hub's 47 s of retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {'x' * 40}\napi_url = {url}\nweb_url = {url}\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    from qai_hub.util import session

    retries = session.MAX_RETRIES
    start = time.monotonic()
    with pytest.raises(hub.HubError, match=r"^could not reach Qualcomm AI Hub .*needs network access") as e:
        hub.profile(art, DEVICE)
    assert time.monotonic() - start < 10
    assert "\n" not in str(e.value) and session.MAX_RETRIES == retries
