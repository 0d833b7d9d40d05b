"""LoRA recovery, perplexity, token windows, atomic outputs and the CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from prunekit.data.tokens import chunks, random_windows
from prunekit.errors import PrunekitError
from prunekit.evaluation.perplexity import perplexity
from prunekit.pipeline.outputs import atomic_dir, atomic_file
from prunekit.training.lora import LoraSettings, train_lora


def settings(**kw) -> LoraSettings:
    base = dict(
        rank=4,
        alpha=8.0,
        dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        learning_rate=1e-2,
        batch_size=2,
        steps=3,
        warmup_steps=1,
        weight_decay=0.0,
        seed=7,
    )
    base.update(kw)
    return LoraSettings(**base)


def blocks() -> torch.Tensor:
    return torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(3))


def test_lora_is_seeded_and_merged() -> None:
    a, losses_a = train_lora(tiny_model(), blocks(), settings())
    b, losses_b = train_lora(tiny_model(), blocks(), settings())
    c, _ = train_lora(tiny_model(), blocks(), settings(seed=8))
    assert losses_a == losses_b and len(losses_a) == 3
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # Merged: plain Linear modules (no adapters left), and only the targeted weights changed.
    assert not any("lora" in k for k in sa)
    dense = tiny_model().state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], dense[k])}
    assert changed and all(k.split(".")[-2] in {"q_proj", "v_proj", "down_proj"} for k in changed)


def test_lora_leaves_the_callers_random_state_alone() -> None:
    """LoRA init and dropout draw from torch's global generator, seeded inside train_lora and restored after."""
    model = tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_lora(model, blocks(), settings(dropout=0.1))
    assert torch.equal(torch.rand(3), expected)


def test_lora_lowers_training_loss() -> None:
    data = blocks()
    _, losses = train_lora(tiny_model(), data, settings(steps=30, batch_size=6, learning_rate=3e-2))
    assert losses[-1] < losses[0] - 0.1


def test_lora_target_error() -> None:
    with pytest.raises(PrunekitError, match=r"recover.lora.target_modules \['qkv'\] match no Linear module"):
        train_lora(tiny_model(), blocks(), settings(target_modules=["qkv"]))


def test_perplexity_equals_independent_computation() -> None:
    model = tiny_model()
    data = chunks(torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1)), 16, "test")
    got = perplexity(model, data, batch_size=4)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in data:  # one chunk at a time, log-softmax and gather by hand
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            nll -= logp[torch.arange(15), row[1:]].sum().item()
            n += 15
    assert got["tokens"] == n == 6 * 15
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_chunks_and_windows() -> None:
    stream = torch.arange(50)
    c = chunks(stream, 16, "eval")
    assert c.shape == (3, 16) and torch.equal(c.reshape(-1), torch.arange(48))
    w1, w2 = random_windows(stream, 5, 8, seed=1), random_windows(stream, 5, 8, seed=1)
    assert torch.equal(w1, w2) and w1.shape == (5, 8)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 8)) for row in w1)  # contiguous windows
    with pytest.raises(PrunekitError, match="fewer than one chunk of 64"):
        chunks(stream, 64, "evaluation")
    with pytest.raises(PrunekitError, match="fewer than calibrate.seq_len=64"):
        random_windows(stream, 2, 64, seed=0)


def test_atomic_outputs_leave_nothing_on_failure(tmp_path) -> None:
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "m.json") as tmp:
            tmp.write_text("{")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "ok").read_text() == "1"


def test_cli_list_and_info(tmp_path, tokenizer, capsys) -> None:
    from prunekit.cli import main
    from prunekit.models.families import adapter_for
    from prunekit.models.saving import save_model
    from prunekit.models.size import count_params
    from prunekit.pruning.criteria import CRITERIA
    from prunekit.pruning.plan import Plan
    from prunekit.pruning.slicing import apply_plan
    from prunekit.pruning.units import UNITS

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in CRITERIA.names() + UNITS.names() + ["uniform", "python-docs", "hf:wikitext2", "llama"]:
        assert f"  {name} " in listed
    model = tiny_model(vocab_size=len(tokenizer))
    adapter = adapter_for(model.config)
    plan = Plan(
        keep={"mlp_channel": {1: list(range(24))}, "attn_kv_group": {2: [0, 3]}},
        params_before=0,
        params_after=0,
        target=0,
        allocation="test",
    )
    pruned = apply_plan(copy.deepcopy(model), adapter, plan)
    save_model(pruned, adapter, tokenizer, tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    info = capsys.readouterr().out
    assert f"parameters:   {count_params(pruned):,}" in info
    assert "    1        8         4            24" in info
    assert "    2        4         2            64" in info
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "config.json missing" in capsys.readouterr().err


def test_kd_loss_equals_its_formula() -> None:
    """temperature^2 * mean over predicted tokens of KL(p_teacher || p_model), softened, from full logits."""
    from prunekit.training.loss import kd_loss

    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    ids = blocks()[:3]
    for temperature in (1.0, 2.5):
        got = kd_loss(student, teacher, ids, temperature, chunk_tokens=5)  # chunks that cut across windows
        with torch.no_grad():
            s = torch.log_softmax(student(input_ids=ids).logits[:, :-1].double() / temperature, -1)
            t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].double() / temperature, -1)
        expected = temperature**2 * (t.exp() * (t - s)).sum(-1).mean()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert kd_loss(teacher, teacher, ids).abs().item() < 1e-6  # a model distilled from itself: no loss


def test_distillation_trains_only_the_adapters() -> None:
    from prunekit.rng import seeded
    from prunekit.training.lora import attach_lora, recovery_loss

    teacher = tiny_model(seed=2)
    with seeded(0):
        student = attach_lora(tiny_model(seed=1), settings())
    ids = blocks()[:2]
    for kind in ("kd", "lm_kd"):
        student.zero_grad(set_to_none=True)
        recovery_loss(kind, teacher, 2.0)(student, ids).backward()
        trained = {n for n, p in student.named_parameters() if p.grad is not None}
        assert trained and trained == {n for n, p in student.named_parameters() if p.requires_grad}
        assert all("lora_" in n for n in trained)
        assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(PrunekitError, match="recover.loss 'kd' distils from the dense model"):
        recovery_loss("kd", None, 1.0)


def test_full_fine_tuning_takes_adamw_steps_on_every_weight() -> None:
    """recover.method full: one step at learning rate lr moves every weight by AdamW's first step,
    -lr * g / (|g| + eps) for the gradient g of the batch (computed here independently), and leaves the
    requires_grad flags as they were."""
    from prunekit.training.lora import train_full
    from prunekit.training.loss import lm_loss

    model, ids = tiny_model(seed=1), blocks()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = tiny_model(seed=1)
    lm_loss(reference, ids).backward()  # one batch of all blocks: the order does not change the mean loss
    grads = {n: p.grad for n, p in reference.named_parameters()}
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen weight is trained too, then frozen again
    cfg = settings(learning_rate=1e-3, batch_size=ids.shape[0], steps=1, warmup_steps=0)
    trained, losses = train_full(model, ids, cfg)
    assert losses[0] == pytest.approx(lm_loss(reference, ids).item(), rel=1e-5)
    for name, p in trained.named_parameters():
        g = grads[name]
        expected = before[name] - 1e-3 * g / (g.abs() + 1e-8)
        # Where |g| is near eps, g / (|g| + eps) turns float rounding of g (two computations of it, the CPU's kernels)
        # into a visible step difference: there the step is checked to be at most lr.
        clear = g.abs() > 1e-6
        torch.testing.assert_close(p.detach()[clear], expected[clear], rtol=0, atol=1e-6, msg=name)
        assert float((p.detach() - before[name]).abs().max()) <= 1e-3 + 1e-6, name
    assert not model.model.embed_tokens.weight.requires_grad and model.model.norm.weight.requires_grad
    assert not trained.training


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recover_stage_trains_what_the_method_names(method: str, tiny_model_dir, tmp_path) -> None:
    """recover.method: lora changes only the adapted modules (merged); full changes every weight."""
    import json
    from pydoc_data.topics import topics

    from safetensors.torch import load_file
    from test_criteria_activation import load_stage

    from prunekit.pipeline.params import parse_params

    text = tmp_path / "text"
    text.mkdir()
    (text / "training.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:8]))
    lora = {"steps": 2, "batch_size": 2, "seq_len": 16, "warmup_steps": 0, "target_modules": ["q_proj", "v_proj"]}
    params = parse_params({"recover": {"method": method, "lora": lora}})
    out = tmp_path / "recovered"
    load_stage("recover").recover(params, model_dir=tiny_model_dir, teacher=tiny_model_dir, text=text, out=out,
                                  loss_file=tmp_path / "loss.json", plot=tmp_path / "loss.png")  # fmt: skip
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {name for name, t in after.items() if not torch.equal(t, before[name])}
    if method == "full":
        assert changed == set(after)
    else:
        assert changed == {n for n in after if n.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(json.loads((tmp_path / "loss.json").read_text())) == 2
