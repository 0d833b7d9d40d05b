"""Tiny models and tokenizers for tests: a 2-4 layer GQA Llama with random weights, no network."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import prunekit.models.families  # noqa: F401  (registers the pruned Auto classes)

# Every process the suite starts inherits this mark; none may outlive the session (pytest_sessionfinish).
SESSION_MARK = "PRUNEKIT_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, f"{os.getpid()}-{time.time_ns()}")
# Shared Prefect servers that stages start stop soon after their last stage (default: 5 minutes).
os.environ.setdefault("PRUNEKIT_PREFECT_IDLE_S", "15")
LEFTOVER_WAIT_S = 90.0  # how long finished tests' servers may take to stop on their own


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group, for certain: SIGTERM,
    then SIGKILL after ``grace_s``; never fails on how long it takes."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 60.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # the group's other members (a worker's flow-run processes) go too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def marked_processes(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes (not zombies) whose environment carries ``mark``."""
    needle = f"{SESSION_MARK}={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append((int(proc.name), cmdline))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process the suite started is left: servers stopping on their own get ``LEFTOVER_WAIT_S``; what is left
    then is killed and fails the session."""
    mark = os.environ[SESSION_MARK]
    deadline = time.time() + LEFTOVER_WAIT_S
    left = marked_processes(mark)
    while left and time.time() < deadline:
        time.sleep(1)
        left = marked_processes(mark)
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listing = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in left)
    session.config.get_terminal_writer().line(f"processes the tests started were still running (killed):\n{listing}",
                                                red=True)  # fmt: skip
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_config(**overrides: object) -> LlamaConfig:
    """GQA Llama: 8 query heads share 4 k/v heads (2 per group), head_dim 8, hidden 48."""
    kw: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    # Random init gives near-zero norms' effect; perturb norms so masking errors cannot hide behind them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_tokenizer(vocab_size: int = 128, unk: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on Python's documentation text (offline, deterministic); ``unk``: with an
    ``<unk>`` token too (Gemma's tokenizer class requires one)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<unk>"] if unk else ["<eos>"],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[: vocab_size - 40],  # a set: its order varies
        show_progress=False,
    )
    texts = [topics[k] for k in sorted(topics)][:20]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>" if unk else None)


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model directory with tokenizer, usable as `model.source`."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def block_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model whose Linear input widths are multiples of llama.cpp's block of 32 (hidden 64, MLP 128),
    with a byte-level BPE tokenizer that has merges (llama.cpp needs them): the whole pipeline through export."""
    path = tmp_path_factory.mktemp("block_model")
    tok = tiny_tokenizer(300)
    model = tiny_model(vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- the pipeline on the tiny model, through real dvc and a Prefect server (test_pipeline, test_sweeps) ----

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One Prefect server for the session: each flow run then costs ~1 s instead of a temporary server."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect_home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    log = open(tmp_path_factory.mktemp("prefect_log") / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--no-services",
            "--analytics-off",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"Prefect server did not start; see {log.name}") from None
                time.sleep(0.5)
        yield env
    finally:
        stop_group(server)
        log.close()


def downloaded_base(model_dir: Path, dest: Path) -> Path:
    """``model_dir`` copied to ``dest`` with the record the download stage leaves (made from ``model_dir``), so the
    params checks read its shapes and tokenizer as they do models/base."""
    shutil.copytree(model_dir, dest)
    (dest / "prunekit.json").write_text(json.dumps({"source": {"source": str(model_dir)}}))
    return dest


def tiny_params(model_dir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = str(model_dir)
    params["calibrate"].update(samples=4, seq_len=16)
    params["score"]["batch_size"] = 2
    # The tests' own cut, whatever the committed first-look profile chooses: param_first scores every family and
    # unit type, and a uniform cut exports to every family's llama.cpp graph.
    params["score"]["criterion"] = "param_first"
    params["prune"]["allocation"] = "uniform"
    # 8 MLP channels of 2 layers hold 2.6% of the tiny model: its achievable fractions are coarse.
    params["prune"].update(skip_first=1, skip_last=1, tolerance=0.02)
    # The tiny model's widths are too few for llama.cpp's 32-wide blocks at fine pruning steps: fine widths,
    # pure-torch schemes for the search, and an F16 export (its per-layer widths, metadata and tokenizer).
    params["prune"]["round_to"].update(attn_kv_group=1, mlp_channel=8)
    params["search"]["choices"] = ["rtn3", "rtn4", "rtn8"]
    params["export"].update(types="f16", embedding="f16")
    params["recover"]["lora"].update(steps=2, batch_size=2, seq_len=32, warmup_steps=1)
    params["evaluate"].update(seq_lens=[16, 32], max_chunks=8)
    params["evaluate"]["zero_shot"].update(auto_mc_questions=4, auto_mc_context_words=12, auto_mc_continuation_words=4)
    params["evaluate"]["speed"].update(batch_sizes=[1, 2], prompt_len=8, new_tokens=2, repeats=1)
    params["search"].update(trials=3, random_starts=1, samples=2, seq_len=16, batch_size=2, budget_bits=5.0)
    params["quantize"].update(group_size=16)
    params["quantize"]["lora"].update(steps=2, batch_size=2, seq_len=32)
    return params


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def copy_pipeline(path: Path) -> None:
    """The project's pipeline into ``path``: dvc.yaml, the stages and flows, and the library code the stages
    depend on (dvc.yaml lists src/prunekit files as deps; the stages run the installed prunekit)."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, path / name)
    for name in ("stages", "flows", "src/prunekit"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, block_model_dir: Path, prefect_env: dict[str, str]) -> Path:
    """A git + DVC repository with the project's dvc.yaml and stages, on the tiny model."""
    path = tmp_path_factory.mktemp("repo")
    copy_pipeline(path)
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(block_model_dir), sort_keys=False))
    env = prefect_env
    run(["git", "init", "-q"], path, env)
    run(["git", "config", "user.email", "test@example.com"], path, env)
    run(["git", "config", "user.name", "test"], path, env)
    run(["dvc", "init", "-q"], path, env)
    run(["dvc", "config", "core.analytics", "false"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-q", "-m", "init"], path, env)
    return path
