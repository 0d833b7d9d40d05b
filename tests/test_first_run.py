"""What a first run on a fresh machine relies on: cheap refusals, reproducible outputs, a pinned install,
one shared Prefect server, nothing left behind by a killed writer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from packaging.requirements import Requirement

from prunekit.errors import ParamsError, PrunekitError
from prunekit.evaluation.summary import model_rows, summary_table
from prunekit.models.loading import load_model
from prunekit.models.saving import save_model
from prunekit.pipeline.outputs import atomic_dir
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.validation import check_choices

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ install


def test_the_lock_is_what_is_installed() -> None:
    """setup.sh installs requirements.lock: every pinned package is installed at its pinned version, and
    `pip check` finds no conflict."""
    pins = [Requirement(line) for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line]
    assert len(pins) > 50
    wrong = {}
    for req in pins:
        version = metadata.version(req.name)
        if not req.specifier.contains(version, prereleases=True):
            wrong[req.name] = (str(req.specifier), version)
    assert wrong == {}
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# ------------------------------------------------------------------ cheap checks first


def write_gguf(path: Path, architecture: str, n_embd: int = 64, vocab: int = 256) -> None:
    """A GGUF file of ``architecture`` with a few quantized tensors (contents do not matter here)."""
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_embedding_length(n_embd)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(rng.standard_normal((vocab, n_embd), dtype=np.float32),
                 gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # fmt: skip
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture_is_refused_from_the_header(tmp_path: Path, monkeypatch) -> None:
    """A Phi-3 GGUF (fused qkv: no family prunes it) is refused from its header, by params validation and by the
    download, before anything is dequantized, and the download leaves nothing behind."""
    import transformers

    from prunekit.models.sources import materialize_model

    path = tmp_path / "phi-3.Q4_0.gguf"
    write_gguf(path, "phi3", n_embd=512, vocab=32768)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF file was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    start = time.perf_counter()
    expected = r"unsupported architecture 'phi3' \(from the GGUF header\)\. Supported: gemma3, llama, qwen2, qwen3\."
    with pytest.raises(ParamsError, match=r"model.source'.*" + expected):
        check_choices(parse_params({"model": {"source": str(path)}}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PrunekitError, match=expected):
        materialize_model(str(path), out)
    assert time.perf_counter() - start < 5.0
    assert list(out.iterdir()) == []


def test_unsupported_config_architecture_is_refused_from_config_json(tmp_path: Path) -> None:
    """A Hugging Face directory of a family prunekit does not prune is refused from its config.json alone."""
    (tmp_path / "config.json").write_text('{"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ParamsError, match=r"unsupported architecture 'phi3' \(from config.json\)\. Supported model "
                       r"types: gemma3_text, llama, mistral, qwen2, qwen3\."):  # fmt: skip
        check_choices(parse_params({"model": {"source": str(tmp_path)}}))


def test_truncated_gguf_is_reported_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "half.gguf"
    write_gguf(path, "llama", n_embd=256, vocab=4096)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParamsError, match=r"is truncated \([0-9,]+ bytes; its header describes [0-9,]+\)"):
        check_choices(parse_params({"model": {"source": str(path)}}))


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", r"'gpu0' is not a device name; use cpu, cuda or cuda:N"),
        ("meta", r"'meta': unsupported device type 'meta'"),
    ],
)
def test_bad_device_names_are_refused(device: str, message: str) -> None:
    with pytest.raises(ParamsError, match=r"model.device': " + message):
        check_choices(parse_params({"model": {"device": device}}))


def test_cuda_is_checked_with_the_params() -> None:
    params = parse_params({"model": {"device": "cuda"}})
    if torch.cuda.is_available():
        check_choices(params)  # accepted where there is a GPU
        with pytest.raises(ParamsError, match=r"CUDA device\(s\), 0-based"):
            check_choices(parse_params({"model": {"device": f"cuda:{torch.cuda.device_count()}"}}))
    else:
        with pytest.raises(ParamsError, match=r"model.device': 'cuda': .*; use cpu here"):
            check_choices(params)


def test_params_refusals_found_by_the_probe(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"evaluate.local_files.unknown': no local copy is read for 'unknown'"):
        check_choices(parse_params({"evaluate": {"local_files": {"unknown": None}}}))
    with pytest.raises(ParamsError, match=r"search.budget_bits': 2.0 is below the narrowest scheme .* \(4 bits\)"):
        check_choices(parse_params({"search": {"budget_bits": 2.0}}))
    with pytest.raises(ParamsError, match=r"runtime.threads': Input should be greater than or equal to 1"):
        parse_params({"runtime": {"threads": 0}})


def test_pickle_only_and_truncated_models_are_refused_clearly(tmp_path: Path, tokenizer) -> None:
    model = tiny_model(vocab_size=len(tokenizer))
    good = tmp_path / "good"
    model.save_pretrained(good)
    tokenizer.save_pretrained(good)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PrunekitError, match=r"only pickled weights \(pytorch_model.bin\); prunekit loads safetensors"):
        load_model(pickled)
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PrunekitError, match=r"cannot be loaded, it is corrupt or incomplete .*dvc checkout"):
        load_model(good)


@pytest.mark.parametrize(
    ("args", "setup", "message"),
    [
        (["info", "{dir}"], "pickle", "only pickled weights"),
        (["info", "{dir}/missing"], "none", "config.json missing"),
        (["export", "{dir}", "--out", "{dir}/m.gguf", "--type", "Q9_9"], "none", "--type 'Q9_9' is not one"),
        (["export", "{dir}", "--out", "{dir}/m.gguf", "--embedding", "q7"], "none", "--embedding 'q7' is not one"),
    ],
)
def test_cli_refusals_are_one_line(tmp_path: Path, args: list[str], setup: str, message: str) -> None:
    if setup == "pickle":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    cmd = [sys.executable, "-m", "prunekit.cli", *[a.format(dir=tmp_path) for a in args]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr


@pytest.mark.parametrize(
    ("params_text", "message"),
    [
        (None, r"params file '.*/params.yaml' not found; run from the repository root"),
        ("prune:\n  target: [0.2\n", r"params file '.*/params.yaml' is not valid YAML at line 3"),
    ],
)
def test_pipeline_flow_refuses_missing_or_broken_params(tmp_path: Path, params_text: str | None, message: str) -> None:
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    out = subprocess.run(
        [sys.executable, str(ROOT / "flows/pipeline.py"), "run"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and re.search(message, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ reproducible outputs


def test_saved_model_holds_no_versions_or_paths(tmp_path: Path, tokenizer) -> None:
    """Two saves of one model from different folders give the same bytes, with no library version inside."""
    from peft import LoraConfig, get_peft_model

    from prunekit.models.families import adapter_for

    model = tiny_model(vocab_size=len(tokenizer))
    for name in ("a", "b"):
        save_model(model, adapter_for(model.config), tokenizer, tmp_path / name / "model")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"model/config.json", "model/model.safetensors", "model/tokenizer.json"}
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    config = json.loads((tmp_path / "a/model/config.json").read_text())
    assert "transformers_version" not in config
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    from prunekit.models.provenance import make_reproducible

    make_reproducible(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert "peft_version" not in adapter_config and adapter_config["base_model_name_or_path"] is None
    assert not (tmp_path / "adapter/README.md").exists()


def test_adapter_files_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes with Python's hash seed: two processes
    with different seeds save byte-identical adapter directories once made reproducible."""
    code = textwrap.dedent(
        """
        import sys, torch
        from peft import LoraConfig, get_peft_model
        from conftest import tiny_model
        from prunekit.models.provenance import make_reproducible
        model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj",
                               "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model.save_pretrained(sys.argv[1])
        make_reproducible(sys.argv[1])
        """
    )
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT / "tests"))
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], check=True, env=env, capture_output=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    modules = json.loads((tmp_path / "1" / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) == 7


def test_gguf_conversion_does_not_depend_on_where_the_file_lies(tmp_path: Path) -> None:
    from test_sources import write_tiny_gguf

    from prunekit.models.sources import materialize_model

    records = []
    for where in ("x", "y/z"):
        path = tmp_path / where / "tiny.Q8_0.gguf"
        path.parent.mkdir(parents=True)
        write_tiny_gguf(path, gguf.GGMLQuantizationType.Q8_0)
        out = tmp_path / where / "out"
        out.mkdir()
        records.append((out, materialize_model(str(path), out)))
    (a, rec_a), (b, rec_b) = records
    assert rec_a["gguf_file"] == rec_b["gguf_file"] == "tiny.Q8_0.gguf" and "transformers_version" not in rec_a
    assert {k: v for k, v in rec_a.items() if k != "source"} == {k: v for k, v in rec_b.items() if k != "source"}
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
        assert str(tmp_path) not in f.read_bytes().decode("latin-1")


# ------------------------------------------------------------------ nothing left behind


def test_a_killed_writer_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    """A writer killed (SIGKILL) inside atomic_dir leaves its temporary folder; the next writer removes it."""
    final = tmp_path / "models" / "pruned"
    code = textwrap.dedent(
        f"""
        import sys, time
        from prunekit.pipeline.outputs import atomic_dir
        with atomic_dir({str(final)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and left.name.startswith(f".pruned.tmp-{proc.pid}-") and not final.exists()
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not left.exists() and [p.name for p in final.parent.iterdir()] == ["pruned"]


def test_a_live_writers_temporary_is_kept(tmp_path: Path) -> None:
    final = tmp_path / "out"
    other = tmp_path / f".out.tmp-{os.getppid()}-abc"  # the parent (pytest's runner) is alive
    other.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("1")
    assert other.is_dir()


# ------------------------------------------------------------------ summary


def eval_metrics(params: int, weight_bytes: int, ppl: float, acc: float, decode: float) -> dict:
    return {
        "params": params,
        "weight_bytes": weight_bytes,
        "ppl": {"python-docs-evaluation-128": ppl},
        "zero_shot": {"auto_mc": {"acc": acc}, "average": {"acc": acc}},
        "efficiency": {"batch_16": {"decode_tokens_per_s": decode * 5}, "batch_1": {"decode_tokens_per_s": decode}},
    }


def test_summary_has_a_row_per_evaluated_model() -> None:
    metrics = {
        "workspace": {
            "data": {
                "metrics/prune.json": {"data": {"achieved_fraction": 0.2, "params_before": 1000}},
                "metrics/eval/quantized.json": {"data": eval_metrics(800, 500, 37.2, 0.6, 7.0)},
                "metrics/eval/dense.json": {"data": eval_metrics(1000, 4000, 22.1, 0.7, 18.0)},
                "metrics/eval/recovered.json": {"data": eval_metrics(800, 3200, 31.4, 0.65, 21.0)},
                "metrics/eval/pruned.json": {"data": eval_metrics(800, 3200, 53.2, 0.55, 21.5)},
                "metrics/search.json": {"data": {"best": {"loss": 3.9}}},
            }
        }
    }
    rows = model_rows(metrics)
    assert [r.name for r in rows] == ["dense", "pruned", "recovered", "quantized"]
    lines = summary_table(rows).splitlines()
    assert lines[0].split()[:3] == ["model", "parameters", "removed"] and "(bs1)" in lines[0]
    table = {line.split()[0]: line.split() for line in lines[2:6]}
    assert table["dense"][1:] == ["1,000", "0.00%", "0.0", "32.00", "22.10", "0.700", "18.0"]
    assert table["quantized"][1:] == ["800", "20.00%", "0.0", "5.00", "37.20", "0.600", "7.0"]
    assert "python-docs-evaluation-128" in lines[-1]
    with pytest.raises(PrunekitError, match="no evaluated model"):
        model_rows({"workspace": {"data": {"metrics/prune.json": {"data": {"achieved_fraction": 0.2}}}}})


# ------------------------------------------------------------------ the shared Prefect server


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "prefect_home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return home


def test_one_shared_server_is_reused_and_stops_when_idle(fresh_home: Path) -> None:
    from prunekit.pipeline.prefect_server import _alive, server_status, shared_api_url, stop_server

    url, mine = shared_api_url(idle_s=2.0)
    try:
        first = server_status()
        assert first is not None and first["url"] == url and first["healthy"] and os.getpid() in first["clients"]
        # A second stage, in another process, joins the same server instead of starting one.
        code = "from prunekit.pipeline.prefect_server import shared_api_url; print(shared_api_url()[0])"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
        assert other.stdout.strip() == url
        assert server_status()["pid"] == first["pid"]
        mine.unlink()  # this "stage" ends: no live client left (the other process has exited)
        deadline = time.monotonic() + 60
        while _alive(first["pid"], first["started"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(first["pid"], first["started"]), "the idle server did not stop"
        assert server_status() is None and not (fresh_home / "prunekit-server" / "server.json").exists()
    finally:
        stop_server()


def test_a_running_stage_keeps_the_server_and_stop_ends_it(fresh_home: Path) -> None:
    from prunekit.pipeline.prefect_server import _alive, server_status, shared_api_url, stop_server

    url, mine = shared_api_url(idle_s=1.0)
    status = server_status()
    time.sleep(4)  # idle for longer than idle_s, but this process is registered and alive
    assert _alive(status["pid"], status["started"]) and server_status()["healthy"]
    assert stop_server() == url
    assert not _alive(status["pid"], status["started"]) and server_status() is None
    mine.unlink()


def test_a_configured_api_url_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.pipeline.prefect_server import configured_api_url

    monkeypatch.setenv("PREFECT_API_URL", "http://example.invalid:4200/api")
    assert configured_api_url() == "http://example.invalid:4200/api"


def test_stage_flows_send_no_heartbeats_unless_configured(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's flow runs without Prefect's heartbeat thread (joined at the end of every run: about 1 s), unless
    the user set a heartbeat frequency, which is kept."""
    import argparse

    from prunekit.pipeline.prefect_server import stop_server
    from prunekit.pipeline.runtime import run_stage

    seen: list[object] = []

    def body(params, **_: object) -> None:
        from prefect.settings import get_current_settings

        seen.append(get_current_settings().flows.heartbeat_frequency)

    params = fresh_home.parent / "params.yaml"
    params.write_text("seed: 0\n")
    try:
        assert run_stage("probe", argparse.ArgumentParser(), body, ["--params", str(params)]) == 0
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
        assert run_stage("probe", argparse.ArgumentParser(), body, ["--params", str(params)]) == 0
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # Send this process's flow-run logs and events while the server still listens, then stop it.
        APILogWorker.drain_all()
        EventsWorker.drain_all()
        stop_server()
    assert seen == [None, 60]


# The tiny tokenizer is used by the summary-free tests above through the conftest fixture.
assert tiny_tokenizer is not None
