"""Schedules: cubic fractions, mask == slice with LoRA, masked training == sliced training, iterative and k-shot
runs, and resume equivalence."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from test_head_dims import grouped_plan

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.size import count_params
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import PlanRequest
from prunekit.pruning.schedules import (
    Cut,
    IterativeSettings,
    KShotSettings,
    PruneJob,
    UnitMasks,
    cubic_fraction,
    iterative_prune,
    kshot_prune,
    kshot_targets,
)
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.training.lora import LoraSettings
from prunekit.training.loss import lm_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
UNITS = ["attn_kv_group", "mlp_channel"]
LAYERS = [1, 2]


def test_cubic_fraction_per_step() -> None:
    total, target = 20, 0.5
    got = [cubic_fraction(s, total, target, 0.1, 0.2) for s in range(total)]
    # 2 warm-up steps, a ramp of 14, 4 cool-down steps: 0, then target * (1 - (1 - k/14)^3), then target.
    expected = [0.0, 0.0] + [target * (1 - (1 - k / 14) ** 3) for k in range(1, 15)] + [target] * 4
    assert got == pytest.approx(expected)
    assert all(a <= b for a, b in zip(got, got[1:], strict=False)) and got[15] == target
    with pytest.raises(PrunekitError, match="leave no step of 10 to prune in"):
        cubic_fraction(0, 10, 0.5, 0.5, 0.5)
    assert kshot_targets(4, 0.5) == [0.125, 0.25, 0.375, 0.5]
    # A later shot: 1000 params originally, 900 left; 30% of the original gone means 700 left, i.e. 2/9 of the
    # current model; a tolerance of 0.01 of the original (10 params) is 1/90 of the current one.
    req = PlanRequest.of_original(0.3, 1000, 900, [], {"mlp_channel": 8}, 0.01)
    assert req.target == pytest.approx(2 / 9) and req.tolerance == pytest.approx(1 / 90)
    assert req.total_params == 900 and req.round_to == {"mlp_channel": 8}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_lora(model, seed: int = 0):
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # B = 0 at init: make the adapters matter
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm


@pytest.mark.parametrize("units", [UNITS, ["attn_query_head"], ["attn_qk_dim", "attn_vo_dim", "mlp_channel"]])
def test_masks_on_lora_model_equal_merged_then_sliced(units: list[str]) -> None:
    dense = tiny_model()
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, units, seed=2)
    masks = UnitMasks(dense, adapter, units, list(range(4)))
    pm = _with_lora(copy.deepcopy(dense))
    masks.set_plan(plan)
    masks.attach(pm)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    masked = _logits(pm, ids)
    masks.detach()
    unmasked = _logits(pm, ids)
    sliced = apply_plan(pm.merge_and_unload(), adapter, plan, mode="slice")
    assert (masked - _logits(sliced, ids)).abs().max() < 1e-5
    assert (masked - unmasked).abs().max() > 1e-3  # the hooks did something


def _lora_params(pm):
    return {n: p for n, p in pm.named_parameters() if "lora_" in n}


def test_masked_training_equals_training_the_sliced_model() -> None:
    """With a fixed mask and no dropout, LoRA trained on the masked model, merged and sliced, equals LoRA trained
    from the same (sliced) start on the sliced model: masked rows/columns get exactly zero gradient."""
    dense = tiny_model()
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, UNITS, seed=4)
    masks = UnitMasks(dense, adapter, UNITS, list(range(4)))
    masks.set_plan(plan)
    masked = _with_lora(copy.deepcopy(dense), seed=1)
    sliced = _with_lora(apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice"), seed=1)
    # Start the sliced adapters from the masked ones' kept rows (B) and columns (A).
    layers = adapter.layers(masked)
    with torch.no_grad():
        for idx, layer in enumerate(adapter.layers(sliced)):
            for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
                src, dst = layers[idx].get_submodule(path), layer.get_submodule(path)
                a, b = src.lora_A["default"].weight, src.lora_B["default"].weight
                rows = masks.masks.get((idx, path, "out"), torch.ones(b.shape[0])).bool()
                cols = masks.masks.get((idx, path, "in"), torch.ones(a.shape[1])).bool()
                dst.lora_A["default"].weight.copy_(a[:, cols])
                dst.lora_B["default"].weight.copy_(b[rows])
    masks.attach(masked)
    blocks = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(3))
    for pm in (masked, sliced):
        opt = torch.optim.Adam(list(_lora_params(pm).values()), lr=1e-2)
        pm.train()
        for step in range(4):
            lm_loss(pm, blocks[2 * (step % 3) : 2 * (step % 3) + 2]).backward()
            opt.step()
            opt.zero_grad()
    masks.detach()
    a = apply_plan(masked.merge_and_unload(), adapter, plan, mode="slice")
    b = sliced.merge_and_unload()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), tiny_model().parameters(), strict=False))


def _iterative_setup(steps: int = 12):
    model = tiny_model()
    adapter = adapter_for(model.config)
    req = PlanRequest(
        target=0.1,
        total_params=count_params(model),
        layouts=layouts(model, adapter, UNITS, LAYERS),
        round_to={"mlp_channel": 8},
        tolerance=0.03,
    )
    lora = LoraSettings(4, 8, 0.05, TARGETS, 1e-3, 2, steps, 0, 0.0, seed=7)
    cfg = IterativeSettings(prune_freq=2, warmup=0.2, cooldown=0.2, ema=0.9, checkpoint_every=3, lora=lora)
    blocks = torch.randint(0, 128, (9, 16), generator=torch.Generator().manual_seed(5))
    return model, adapter, req, cfg, blocks


def test_iterative_schedule_prunes_along_the_cubic_fractions() -> None:
    model, adapter, req, cfg, blocks = _iterative_setup()
    out, plan, history = iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg)
    assert abs(plan.achieved - 0.1) <= 0.03 and count_params(out) == plan.params_after
    fractions = [h["fraction"] for h in history]
    assert fractions[:2] == [0.0, 0.0] and fractions[-1] == plan.achieved
    assert all(a <= b for a, b in zip(fractions, fractions[1:], strict=False)) and len(set(fractions)) >= 3


def test_iterative_resume_equals_uninterrupted(tmp_path: Path) -> None:
    model, adapter, req, cfg, blocks = _iterative_setup()
    full, plan, _ = iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg)
    state = tmp_path / "state"
    model, adapter, req, cfg, blocks = _iterative_setup()
    with pytest.raises(KeyboardInterrupt):
        iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg, state, "k", stop_after=8)
    assert (state / "state.json").is_file()
    model, adapter, req, cfg, blocks = _iterative_setup()
    resumed, plan2, history = iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg, state, "k")
    assert plan2.keep == plan.keep and len(history) == cfg.lora.steps
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # A state from other params is discarded, not resumed.
    model, adapter, req, cfg, blocks = _iterative_setup()
    other, _, _ = iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg, state, "other-key")
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), other.parameters(), strict=True))


def _kshot_job(
    tokenizer,
    state: Path | None = None,
    units: list[str] = UNITS,
    layers: list[int] = LAYERS,
    allocation: str = "uniform",
    criterion: str = "activation",
) -> PruneJob:
    model = tiny_model(vocab_size=len(tokenizer), num_hidden_layers=max(4, layers[-1] + 2))
    adapter = adapter_for(model.config)
    calibration = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(2))
    blocks = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(3))
    n = len(adapter.layers(model))
    cut = Cut(0.12, units, allocation, criterion, layers[0], n - 1 - layers[-1], {}, 0.05)
    first = CRITERIA.get(criterion).score(model, adapter, ScoreRequest(units, layers, calibration, 2, seed=1))
    return PruneJob(model, tokenizer, adapter, first, cut, seed=0, training_blocks=lambda seq_len: blocks,
                    calibration=lambda: calibration, score_batch_size=2, state_dir=state, state_key="k")  # fmt: skip


def _kshot_run(tmp_path: Path, tokenizer, stop_after: int | None = None, state: Path | None = None):
    lora = LoraSettings(4, 8, 0.0, TARGETS, 1e-3, 2, 2, 0, 0.0, seed=11)
    cfg = KShotSettings(target=0.12, shots=3, lora=lora)
    model, _, records = kshot_prune(_kshot_job(tokenizer, state), cfg, stop_after)
    return model, records


def test_kshot_prunes_in_shots_and_resumes(tmp_path: Path, tokenizer) -> None:
    full, records = _kshot_run(tmp_path, tokenizer)
    assert [r["shot"] for r in records] == [1, 2, 3]
    assert [r["target"] for r in records] == pytest.approx([0.04, 0.08, 0.12])
    assert all(abs(r["removed"] - r["target"]) <= 0.05 for r in records)
    assert records[0]["removed"] < records[1]["removed"] < records[2]["removed"]
    state = tmp_path / "kstate"
    with pytest.raises(KeyboardInterrupt):
        _kshot_run(tmp_path, tokenizer, stop_after=2, state=state)
    resumed, records2 = _kshot_run(tmp_path, tokenizer, state=state)
    assert records2 == records
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("schedule", ["iterative", "kshot"])
def test_prune_stage_runs_the_schedules(schedule: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    from pydoc_data.topics import topics

    from safetensors.torch import save_file
    from test_criteria_activation import load_stage

    from prunekit.pipeline.params import parse_params

    params = parse_params(
        {
            "score": {"criterion": "param_first", "batch_size": 2},
            "prune": {"target": 0.1, "skip_first": 1, "skip_last": 1, "tolerance": 0.03, "schedule": schedule,
                      "allocation": "uniform"},
            "schedule": {"prune_freq": 1, "warmup": 0.2, "cooldown": 0.2, "checkpoint_every": 2, "shots": 2,
                         "steps_per_shot": 1, "lora": {"steps": 6, "batch_size": 2, "seq_len": 16}},
        }
    )  # fmt: skip
    text = tmp_path / "text"
    text.mkdir()
    (text / "training.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:8]))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    calib = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": calib}, str(tmp_path / "calib.safetensors"))
    scores = tmp_path / "scores.safetensors"
    load_stage("score").score(
        params, model_dir=tiny_model_dir, calibration_file=tmp_path / "calib.safetensors", out=scores
    )
    load_stage("prune").prune(
        params, model_dir=tiny_model_dir, scores_file=scores, out=tmp_path / "pruned", plan_file=tmp_path / "plan.json",
        metrics_file=tmp_path / "metrics.json", trials_file=tmp_path / "trials.json", text=text,
        calibration=tmp_path / "calib.safetensors",
        state=tmp_path / "state",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    loaded = load_pretrained(tmp_path / "pruned")
    assert metrics["schedule"] == schedule and metrics["params_after"] == count_params(loaded)
    assert abs(metrics["achieved_fraction"] - 0.1) <= 0.03
    assert len(metrics["schedule_log"]) == (6 if schedule == "iterative" else 2)
    assert (tmp_path / "state").is_dir() and not any((tmp_path / "state").iterdir())  # finished: nothing to resume


@pytest.mark.parametrize(
    ("units", "criterion", "allocation"),
    [
        (["attn_kv_group", "mlp_channel"], "activation", "uniform"),
        (["attn_kv_group", "attn_qk_dim", "attn_vo_dim", "mlp_channel"], "param_first", "uniform"),
        (["attn_query_head", "mlp_channel"], "param_first", "global"),
        (["layer", "mlp_channel"], "param_first", "global"),
    ],
)
def test_kshot_plan_numbers_the_dense_model(units: list[str], criterion: str, allocation: str, tokenizer) -> None:
    """Without LoRA steps, the dense model cut once by the k-shot plan is the k-shot model, weight for weight."""
    job = _kshot_job(tokenizer, units=units, layers=[1, 2, 3, 4], allocation=allocation, criterion=criterion)
    job.cut = dataclasses.replace(job.cut, target=0.3, tolerance=0.1)
    dense = copy.deepcopy(job.model)
    lora = LoraSettings(4, 8, 0.0, TARGETS, 1e-3, 2, 0, 0, 0.0, seed=11)
    model, plan, records = kshot_prune(job, KShotSettings(target=0.3, shots=3, lora=lora))
    assert len(records) == 3 and records[0]["removed"] < records[-1]["removed"]
    assert plan.params_before == count_params(dense) and plan.params_after == count_params(model)
    once = apply_plan(dense, job.adapter, plan, mode="slice")
    got, want = dict(model.named_parameters()), dict(once.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(got[name], p), name


TOY_SCHEDULE = '''
"""A toy schedule: two equal cuts by the job's scores, rescored in between, no training."""

from prunekit.pruning.schedules import SCHEDULES, KeptUnits, PruneJob, PruneResult, Schedule
from prunekit.models.size import count_params
from prunekit.pruning.slicing import apply_plan
from prunekit.models.loading import load_pretrained


class Halves(Schedule):
    trains = False

    def run(self, job: PruneJob) -> PruneResult:
        from prunekit.pruning.criteria import CRITERIA, ScoreRequest

        model, adapter, cut = job.model, job.adapter, job.cut
        original, kept, scores = count_params(model), KeptUnits(model, adapter, cut.units), job.scores
        for fraction in (cut.target / 2, cut.target):
            plan = cut.plan(scores, cut.request(model, adapter, fraction, original))
            kept.cut(model, adapter, plan)
            apply_plan(model, adapter, plan, mode="slice")
            req = ScoreRequest(cut.units, cut.layers(model, adapter), job.calibration_tokens(), 2, job.seed)
            scores = CRITERIA.get(cut.criterion).score(model, adapter, req)
        plan.keep, plan.params_before = kept.keep(), original
        return PruneResult(model, plan)


SCHEDULES.register("halves")(Halves())
'''


def test_a_schedule_is_one_module_and_one_registration_line(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """A new schedule registers itself on import; params accept it and the prune step runs it."""
    import importlib.util

    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices
    from prunekit.pruning.schedules import SCHEDULES, prune_model

    monkeypatch.setattr(SCHEDULES, "_items", dict(SCHEDULES._items))  # the registration ends with the test
    (tmp_path / "toy_schedule.py").write_text(TOY_SCHEDULE)
    spec = importlib.util.spec_from_file_location("toy_schedule", tmp_path / "toy_schedule.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    check_choices(parse_params({"prune": {"schedule": "halves"}}))
    job = _kshot_job(tokenizer, layers=[1, 2, 3, 4])
    job.cut = dataclasses.replace(job.cut, target=0.3, tolerance=0.1)
    dense = copy.deepcopy(job.model)
    result = prune_model(job, "halves")
    assert abs(result.plan.achieved - 0.3) <= 0.1 and result.plan.params_after == count_params(result.model)
    once = apply_plan(dense, job.adapter, result.plan, mode="slice")
    for (name, p), q in zip(once.named_parameters(), result.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_units_a_criterion_cannot_score_are_refused_with_the_params() -> None:
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices

    bad = parse_params({"prune": {"units": ["attn_kv_group", "attn_qk_dim"]}, "score": {"criterion": "activation"}})
    with pytest.raises(
        ParamsError, match=r"'prune.units': criterion 'activation' does not support unit type 'attn_qk_dim'"
    ):
        check_choices(bad)


def test_unknown_or_unfit_schedule_is_refused_with_the_key() -> None:
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices

    with pytest.raises(ParamsError, match=r"'prune.schedule': Unknown schedule 'kshots'. Did you mean 'kshot'\?"):
        check_choices(parse_params({"prune": {"schedule": "kshots"}}))
    with pytest.raises(ParamsError, match=r"'prune.units': the iterative schedule masks widths"):
        check_choices(
            parse_params({"prune": {"schedule": "iterative", "units": ["layer"]}, "score": {"criterion": "lora"}})
        )
    with pytest.raises(ParamsError, match=r"'prune.bias_compensation': not available with prune.schedule 'kshot'"):
        check_choices(parse_params({"prune": {"schedule": "kshot", "bias_compensation": True},
                                    "score": {"criterion": "activation"}}))  # fmt: skip


def test_schedules_distil_from_the_unpruned_model_when_asked(tokenizer) -> None:
    """schedule.loss kd: the teacher is a copy of the model as the schedule got it, so the iterative schedule's
    first step (LoRA's B = 0, no mask yet) has a KD loss of 0; with lm it is the LM loss."""
    from prunekit.pipeline.params import ScheduleParams

    model, adapter, req, cfg, blocks = _iterative_setup(steps=4)
    job = PruneJob(model, tokenizer, adapter, {}, Cut(0.1, UNITS, "uniform", "lora"), schedule=ScheduleParams())
    assert job.loss() is None  # lm: the trainer's default
    job.schedule = ScheduleParams(loss="kd", temperature=2.0)
    kd = job.loss()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # later changes to the model leave the teacher
    same = kd(tiny_model(), blocks[:2]).item()
    assert abs(same) < 1e-8 and kd(model, blocks[:2]).item() > 1e-6
    _, _, history = iterative_prune(tiny_model(), adapter, blocks, req, UNITS, LAYERS, "uniform",
                                    dataclasses.replace(cfg, loss=kd))  # fmt: skip
    # The student starts as the teacher (the unpruned model's copy): no loss at the first step, then some.
    assert abs(history[0]["loss"]) < 1e-8 and history[-1]["loss"] > 1e-8
    _, _, plain = iterative_prune(tiny_model(), adapter, blocks, req, UNITS, LAYERS, "uniform", cfg)
    assert plain[0]["loss"] > 1.0


def test_the_iterative_schedule_refits_towards_the_model_it_started_from(tokenizer) -> None:
    """prune.reconstruct least_squares with the iterative schedule: the same LoRA run and plan as without, then the
    merged model is refit towards the dense model before the slice: what the schedule returns is
    reconstruct(merged, reference=dense) sliced, and it is closer to the dense model than the plain result."""
    from prunekit.pipeline.params import ScheduleParams
    from prunekit.pruning.reconstruction import RefitChoice, reconstruct
    from prunekit.pruning.schedules import prune_model

    dense = tiny_model(vocab_size=len(tokenizer)).eval()
    adapter = adapter_for(dense.config)
    calibration = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(2))
    blocks = torch.randint(0, len(tokenizer), (9, 16), generator=torch.Generator().manual_seed(5))
    schedule = ScheduleParams(prune_freq=2, warmup=0.2, cooldown=0.2, checkpoint_every=100,
                              lora={"steps": 10, "batch_size": 2, "seq_len": 16, "learning_rate": 1e-3})  # fmt: skip

    def run(reconstruct_: str):
        cut = Cut(0.1, UNITS, "uniform", "lora", 1, 1, {"mlp_channel": 8}, 0.03, reconstruct=reconstruct_,
                  reconstruct_ridge=(0.01,), reconstruct_holdout=0.0)  # fmt: skip
        job = PruneJob(copy.deepcopy(dense), tokenizer, adapter, {}, cut, seed=3, schedule=schedule,
                       training_blocks=lambda n: blocks, calibration=lambda: calibration,
                       score_batch_size=4)  # fmt: skip
        return prune_model(job, "iterative")

    plain, refit = run("none"), run("least_squares")
    assert refit.plan.keep == plain.plan.keep and refit.log == plain.log
    summary = refit.metrics(0.1, "iterative")["reconstruction"]
    assert summary["projections"] == 4 and summary["error_reconstructed"] < summary["error_sliced"]

    # The same run again, its merged model taken before the slice and refit here towards the dense model.
    captured = []
    lora = LoraSettings.from_params(schedule.lora, 3, "schedule.lora")
    cfg = IterativeSettings(2, 0.2, 0.2, schedule.ema, 100, lora)
    cut = Cut(0.1, UNITS, "uniform", "lora", 1, 1, {"mlp_channel": 8}, 0.03)
    model = copy.deepcopy(dense)
    req = cut.request(model, adapter, 0.1, count_params(model))
    iterative_prune(model, adapter, blocks, req, UNITS, LAYERS, "uniform", cfg,
                    refit=lambda merged, _plan: captured.append(copy.deepcopy(merged)))  # fmt: skip
    expected = captured[0]
    reconstruct(expected, adapter, refit.plan, calibration, 4, RefitChoice((0.01,), 0.0), reference=dense)
    apply_plan(expected, adapter, refit.plan, mode="slice")
    for (name, p), q in zip(expected.named_parameters(), refit.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():
        reference = dense(input_ids=calibration).logits
        errors = [(r.model(input_ids=calibration).logits - reference).norm() for r in (plain, refit)]
    assert errors[1] < errors[0]
