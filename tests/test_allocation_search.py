"""prune.allocation: search: candidates on the target, the objective's formula, the best candidate in the plan,
resume, and the candidates scored as the cut produces them (reconstruction included)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from prunekit.errors import ParamsError, PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.size import count_params
from prunekit.pipeline.params import AllocationSearchParams, parse_params
from prunekit.pipeline.validation import check_choices
from prunekit.pruning.allocations.search import AllocationSearch, Space, candidate_objective, model_objective
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.holdout import held_out_gain
from prunekit.pruning.plan import PlanRequest, plan_of_counts, removed_params
from prunekit.pruning.schedules import Cut, PruneJob, prune_model
from prunekit.pruning.slicing import apply_plan, layouts

UNITS = ["attn_kv_group", "mlp_channel"]
LAYERS = [1, 2, 3, 4]
CALIB = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(4))


def _model():
    return tiny_model(num_hidden_layers=6, intermediate_size=96, initializer_range=0.3)


def _request(model, target: float = 0.25, units=UNITS) -> PlanRequest:
    adapter = adapter_for(model.config)
    return PlanRequest(target, count_params(model), layouts(model, adapter, units, LAYERS), {"mlp_channel": 4}, 0.02)


def _scores(model, units=UNITS):
    req = ScoreRequest(units, LAYERS, CALIB, 3, seed=0)
    return CRITERIA.get("activation").score(model, adapter_for(model.config), req)


def _kl_of_masked(dense, plan, tokens: torch.Tensor = CALIB) -> float:
    """The KL objective computed independently: full logits of both models, KL(p_dense || p_pruned) per position."""
    masked = apply_plan(copy.deepcopy(dense), adapter_for(dense.config), plan, mode="mask")
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=tokens).logits[:, :-1].double(), -1)
        q = F.log_softmax(masked(input_ids=tokens).logits[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_every_candidate_lies_on_the_target_and_the_flat_one_is_uniform() -> None:
    model = _model()
    req = _request(model)
    space = Space(req, max_ratio=0.9, knots=3)
    step = max(lay.params_per_unit * req.round_to.get(lay.unit, 1) for lay in req.layouts)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        if i == 0:
            point = space.flat()
        else:
            knots = (0.05 + 0.95 * torch.rand(2 * 3, generator=gen)).tolist()
            point = knots + (4 * torch.rand(1, generator=gen) - 2).tolist()
        counts = space.counts(point)
        removed = removed_params(counts, req.layouts)
        assert abs(removed - req.target * req.total_params) <= step, (point, removed)
        for lay in req.layouts:  # never more than max_ratio of a unit type, at least one round_to kept
            assert counts[(lay.unit, lay.layer)] >= (1 - 0.9) * lay.count - req.round_to.get(lay.unit, 1)
    flat = space.counts(space.flat())
    for unit in UNITS:
        assert len({flat[(unit, layer)] for layer in LAYERS}) == 1  # one ratio per type in every layer
    # Profiles move parameters between layers: a profile rising with depth keeps more of the first layers.
    rising = space.counts([0.1, 0.5, 1.0, 0.1, 0.5, 1.0, 0.0])
    assert rising[("mlp_channel", LAYERS[0])] > rising[("mlp_channel", LAYERS[-1])]


def test_unreachable_target_is_refused_before_any_candidate() -> None:
    model = _model()
    calls = []
    search = AllocationSearch(AllocationSearchParams(candidates=3, max_ratio=0.2), calls.append, seed=0)
    with pytest.raises(PrunekitError, match="prune.search.max_ratio"):
        search.run(_scores(model), _request(model, target=0.4))
    assert calls == []


@pytest.mark.parametrize("objective", ["kl", "loss"])
def test_objective_equals_its_formula(objective: str) -> None:
    model = _model()
    req = _request(model)
    plan = plan_of_counts(_scores(model), req, Space(req, 0.9, 2).counts([0.2, 1.0, 1.0, 0.3, 0.5]), "search")
    got = candidate_objective(model, adapter_for(model.config), CALIB, 4, objective)(plan)
    if objective == "kl":
        want = _kl_of_masked(model, plan)
    else:
        masked = apply_plan(copy.deepcopy(model), adapter_for(model.config), plan, mode="mask")
        with torch.no_grad():
            logits = masked(input_ids=CALIB).logits[:, :-1]
        want = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), CALIB[:, 1:].reshape(-1)))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got > 0


def _job(model, state: Path | None = None, reconstruct: str = "none", candidates: int = 8, holdout: float = 0.0):
    settings = AllocationSearchParams(candidates=candidates, random_starts=2, knots=2, holdout=holdout)
    cut = Cut(0.25, UNITS, "search", "activation", 1, 1, {"mlp_channel": 4}, 0.02, reconstruct=reconstruct,
              reconstruct_ridge=(0.0,), reconstruct_holdout=0.0, search=settings)  # fmt: skip
    return PruneJob(model, None, adapter_for(model.config), _scores(model), cut, seed=3,
                    calibration=lambda: CALIB, score_batch_size=3, state_dir=state, state_key="k")  # fmt: skip


def test_search_plan_holds_the_best_candidate_on_the_target() -> None:
    dense = _model()
    result = prune_model(_job(copy.deepcopy(dense)), "oneshot")
    trials = result.trials
    assert [t["candidate"] for t in trials] == list(range(8))
    assert [t["source"] for t in trials] == ["flat", "random", "random"] + ["gp"] * 5
    assert all(abs(t["achieved"] - 0.25) <= 0.02 for t in trials)
    assert abs(result.plan.achieved - 0.25) <= 0.02 and result.plan.allocation == "search"
    best = min(trials, key=lambda t: (t["objective"], t["candidate"]))
    assert best["objective"] <= trials[0]["objective"]  # never worse than the flat (uniform) candidate
    # The plan is the best candidate's: its KL, computed independently on the dense model, is the recorded one.
    assert _kl_of_masked(dense, result.plan) == pytest.approx(best["objective"], rel=1e-4)
    assert len({t["objective"] for t in trials}) > 1  # candidates differ
    metrics = result.metrics(0.25, "oneshot")["allocation_search"]
    assert metrics["best_candidate"] == best["candidate"] and metrics["candidates"] == 8
    again = prune_model(_job(copy.deepcopy(dense)), "oneshot")  # seeded: the same search
    assert again.trials == trials and again.plan.keep == result.plan.keep


def test_candidates_are_scored_as_the_cut_produces_them_with_reconstruction() -> None:
    dense = _model()
    result = prune_model(_job(copy.deepcopy(dense), reconstruct="least_squares", candidates=4), "oneshot")
    best = min(result.trials, key=lambda t: (t["objective"], t["candidate"]))
    with torch.no_grad():  # the returned (refit, sliced) model against the dense one
        p = F.log_softmax(dense(input_ids=CALIB).logits[:, :-1].double(), -1)
        q = F.log_softmax(result.model(input_ids=CALIB).logits[:, :-1].double(), -1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) == pytest.approx(best["objective"], rel=1e-4)
    assert best["objective"] < _kl_of_masked(dense, result.plan)  # refit beats plain slicing of that plan


def test_a_killed_search_resumes_from_its_recorded_candidates(tmp_path: Path) -> None:
    dense = _model()
    full = prune_model(_job(copy.deepcopy(dense)), "oneshot")
    job = _job(copy.deepcopy(dense), state=tmp_path / "state")
    evaluated = []
    original_searcher = job.cut.searcher

    def killing_searcher(*args, **kwargs):
        search = original_searcher(*args, **kwargs)
        inner = search.evaluate

        def evaluate(plan):
            if len(evaluated) == 5:
                raise KeyboardInterrupt("killed")
            evaluated.append(plan)
            return inner(plan)

        search.evaluate = evaluate
        return search

    object.__setattr__(job.cut, "searcher", killing_searcher)
    with pytest.raises(KeyboardInterrupt):
        prune_model(job, "oneshot")
    recorded = json.loads((tmp_path / "state" / "allocation_search.json").read_text())
    assert len(recorded["candidates"]) == 5
    evaluated.clear()
    resumed = prune_model(_job(copy.deepcopy(dense), state=tmp_path / "state"), "oneshot")
    assert resumed.trials == full.trials and resumed.plan.keep == full.plan.keep
    other = _job(copy.deepcopy(dense), state=tmp_path / "state")
    other.state_key = "other params"  # a record of other params is not replayed
    assert other.cut.searcher(other.model, other.adapter, other, "")._recorded() == []


def test_kshot_searches_every_shot() -> None:
    from prunekit.pruning.schedules import KShotSettings, kshot_prune
    from prunekit.training.lora import LoraSettings

    model = _model()
    job = _job(model, candidates=3)
    job.training_blocks = lambda seq_len: CALIB
    lora = LoraSettings(4, 8, 0.0, ["q_proj", "v_proj"], 1e-3, 2, 2, 0, 0.0, seed=1)
    _, plan, records = kshot_prune(job, KShotSettings(target=0.25, shots=2, lora=lora))
    assert [t["search"] for r in records for t in r["trials"]] == ["shot 1"] * 3 + ["shot 2"] * 3
    assert abs(records[-1]["removed"] - 0.25) <= 0.02


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"allocation": "search", "units": ["layer"]}, "add one to prune.units"),
        ({"allocation": "search", "schedule": "iterative"}, "re-plans at every mask update"),
        ({"allocation": "search", "units": ["hidden_channel"]}, "add one to prune.units"),
        ({"search": {"objective": "ce"}}, "prune.search.objective"),
    ],
)
def test_search_params_refused(prune: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        check_choices(parse_params({"prune": prune}))


def test_prune_stage_writes_every_candidate(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The prune stage with allocation search: the trials file (a DVC plot) holds every candidate, the metrics the
    best and the flat one, the saved model is the plan's, and the finished search leaves no state behind."""
    from safetensors.torch import save_file
    from test_criteria_activation import load_stage

    params = parse_params({
        "score": {"criterion": "activation", "batch_size": 2},
        "prune": {"target": 0.15, "skip_first": 1, "skip_last": 1, "tolerance": 0.03, "allocation": "search",
                  "search": {"candidates": 5, "random_starts": 2, "knots": 2}},
    })  # fmt: skip
    from pydoc_data.topics import topics

    text = tmp_path / "text"
    text.mkdir()
    (text / "training.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:8]))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    save_file({"input_ids": CALIB % vocab}, str(tmp_path / "calib.safetensors"))
    scores = tmp_path / "scores.safetensors"
    load_stage("score").score(params, model_dir=tiny_model_dir, calibration_file=tmp_path / "calib.safetensors",
                              out=scores)  # fmt: skip
    load_stage("prune").prune(
        params, model_dir=tiny_model_dir, scores_file=scores, out=tmp_path / "pruned", plan_file=tmp_path / "plan.json",
        metrics_file=tmp_path / "metrics.json", trials_file=tmp_path / "trials.json", text=text,
        calibration=tmp_path / "calib.safetensors", state=tmp_path / "state",
    )  # fmt: skip
    trials = json.loads((tmp_path / "trials.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [t["candidate"] for t in trials] == list(range(5)) and plan["allocation"] == "search"
    best = min(trials, key=lambda t: (t["objective"], t["candidate"]))
    assert metrics["allocation_search"]["best_objective"] == best["objective"]
    assert abs(plan["achieved"] - best["achieved"]) < 0.005  # the plan is the best candidate's
    assert metrics["params_after"] == count_params(load_pretrained(tmp_path / "pruned"))
    assert (tmp_path / "state").is_dir() and not any((tmp_path / "state").iterdir())


def _is_flat(plan) -> bool:
    return all(len({len(plan.keep[u][layer]) for layer in LAYERS}) == 1 for u in UNITS)


@pytest.mark.parametrize("flat_wins", [True, False])
def test_the_best_candidate_is_kept_only_if_it_beats_the_flat_profile_on_the_held_out_windows(flat_wins: bool) -> None:
    """Every other candidate beats the flat profile on the search's windows; the held-out judge decides which of the
    best one and the flat profile the search returns, and only those two are judged."""
    model = _model()
    req, scores = _request(model), _scores(model)
    space = Space(req, 0.9, 2)
    judged = []

    def evaluate(plan) -> float:
        return 1.0 if _is_flat(plan) else 0.5 + 0.001 * len(plan.keep["mlp_channel"][LAYERS[0]])

    def judge(plan) -> list[float]:
        judged.append(_is_flat(plan))
        return [float(_is_flat(plan) != flat_wins)] * 3

    settings = AllocationSearchParams(candidates=5, random_starts=2, knots=2)
    search = AllocationSearch(settings, evaluate, seed=0, judge=judge)
    counts = search.run(scores, req)
    rows = search.rows()
    best = min(rows, key=lambda t: (t["objective"], t["candidate"]))
    assert best["candidate"] != 0 and sorted(judged) == [False, True]
    assert [r["candidate"] for r in rows if "held_out" in r] == sorted([0, best["candidate"]])
    kept = 0 if flat_wins else best["candidate"]
    assert [r["candidate"] for r in rows if r["kept"]] == [kept]
    assert counts == space.counts(search.candidates[kept].point)


@pytest.mark.parametrize(
    ("best_windows", "standard_errors", "kept_best"),
    [
        ([0.5, 0.6, 0.4, 0.5], 2.0, True),
        ([0.0, 2.0, 0.2, 1.7], 2.0, False),
        ([1.1, 0.9, 1.05, 0.9], 2.0, False),
        ([0.9], 2.0, True),
        ([0.8, 1.0, 0.9, 1.05], 1.0, True),
        ([0.8, 1.0, 0.9, 1.05], 2.0, False),
        ([1.1, 0.9, 1.05, 0.9], 0.0, True),
    ],
)
def test_the_best_candidate_must_beat_the_flat_profile_by_more_than_the_standard_errors_asked(
    best_windows: list[float], standard_errors: float, kept_best: bool
) -> None:
    """The flat profile scores 1.0 on every held-out window. A best candidate ahead on every window (a gain of 0.5,
    12 standard errors) is kept; one ahead on the mean (0.975 and 0.9875 against 1.0) but with per-window
    differences that spread more than its lead (a standard error of 0.51 and 0.052 against a gain of 0.025 and
    0.0125) is not, unless any gain will do (0 standard errors); a gain of 1.13 standard errors (0.0625, 0.0555)
    passes one standard error and not two; with one window the plain comparison decides."""
    model = _model()
    req, scores = _request(model), _scores(model)

    def evaluate(plan) -> float:
        return 1.0 if _is_flat(plan) else 0.5 + 0.001 * len(plan.keep["mlp_channel"][LAYERS[0]])

    def judge(plan) -> list[float]:
        return [1.0] * len(best_windows) if _is_flat(plan) else best_windows

    settings = AllocationSearchParams(candidates=4, random_starts=2, knots=2, standard_errors=standard_errors)
    search = AllocationSearch(settings, evaluate, 0, judge=judge)
    search.run(scores, req)
    rows = search.rows()
    best = min(rows, key=lambda t: (t["objective"], t["candidate"]))
    assert best["held_out"] == pytest.approx(sum(best_windows) / len(best_windows)) and rows[0]["held_out"] == 1.0
    assert best["held_out_gain_se"] == pytest.approx(held_out_gain([1.0] * len(best_windows), best_windows)[1])
    assert [r["candidate"] for r in rows if r["kept"]] == [best["candidate"] if kept_best else 0]


def test_the_held_out_gain_and_its_standard_error_follow_their_formulas() -> None:
    flat, best = [1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 1.0, 3.0]
    diff = torch.tensor(flat, dtype=torch.float64) - torch.tensor(best, dtype=torch.float64)
    gain, error = held_out_gain(flat, best)
    assert gain == pytest.approx(float(diff.mean()))
    assert error == pytest.approx(float(torch.sqrt(((diff - diff.mean()) ** 2).sum() / 3) / 2))
    assert held_out_gain([2.0], [1.5]) == (0.5, 0.0)


def test_the_judge_scores_each_held_out_window_as_the_objective_scores_them_together() -> None:
    """``per_window``: one KL per window, each the masked model's KL on that window alone (computed independently),
    and their mean the objective over all of them."""
    dense = _model()
    req, scores = _request(dense), _scores(dense)
    plan = plan_of_counts(scores, req, Space(req, 0.9, 2).counts([0.2, 1.0, 1.0, 0.3, 0.5]), "search")
    adapter = adapter_for(dense.config)
    windows = candidate_objective(dense, adapter, CALIB, 4, "kl", per_window=True)(plan)
    assert windows == pytest.approx([_kl_of_masked(dense, plan, CALIB[[i]]) for i in range(6)], rel=1e-4)
    assert sum(windows) / 6 == pytest.approx(candidate_objective(dense, adapter, CALIB, 4, "kl")(plan), rel=1e-6)
    losses = candidate_objective(dense, adapter, CALIB, 4, "loss", per_window=True)(plan)
    assert sum(losses) / 6 == pytest.approx(candidate_objective(dense, adapter, CALIB, 4, "loss")(plan), rel=1e-6)


def test_models_scored_against_one_teacher_share_its_hidden_states() -> None:
    """model_objective: two cuts scored against one teacher. Each figure is that cut's KL from the teacher
    (computed independently), and the teacher ran once per batch of windows for both (2 batches of 4 and 2)."""
    dense = _model()
    req, scores = _request(dense), _scores(dense)
    adapter = adapter_for(dense.config)
    plans = [plan_of_counts(scores, req, Space(req, 0.9, 2).counts(p), "search")
             for p in ([0.2, 1.0, 1.0, 0.3, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0])]  # fmt: skip
    cuts = [apply_plan(copy.deepcopy(dense), adapter, p, mode="slice") for p in plans]
    want = [_kl_of_masked(dense, p) for p in plans]
    runs: list[int] = []
    dense.get_input_embeddings().register_forward_hook(lambda *_: runs.append(1))
    kl = model_objective(dense, CALIB, 4, "kl")
    assert [kl(c) for c in cuts] == pytest.approx(want, rel=1e-4)
    assert len(runs) == 2


def test_the_search_scores_candidates_on_the_other_windows_and_judges_on_the_held_out_ones() -> None:
    """prune.search.holdout 0.25 of the 6 calibration windows: window 3 is held out. Each recorded objective is the
    KL on windows 0, 1, 2, 4, 5; the best and the flat candidate's held-out figures the KL on window 3 (computed
    independently), and the plan is the candidate that wins there; the metrics say which was kept."""
    dense = _model()
    result = prune_model(_job(copy.deepcopy(dense), candidates=5, holdout=0.25), "oneshot")
    rest, held = CALIB[[0, 1, 2, 4, 5]], CALIB[[3]]
    judged = [t for t in result.trials if "held_out" in t]
    best = min(result.trials, key=lambda t: (t["objective"], t["candidate"]))
    assert [t["candidate"] for t in judged] == sorted({0, best["candidate"]}) and best["candidate"] != 0
    kept = min(judged, key=lambda t: (t["held_out"], -t["candidate"]))
    assert [t["candidate"] for t in result.trials if t["kept"]] == [kept["candidate"]]
    assert _kl_of_masked(dense, result.plan, rest) == pytest.approx(kept["objective"], rel=1e-4)
    assert _kl_of_masked(dense, result.plan, held) == pytest.approx(kept["held_out"], rel=1e-4)
    metrics = result.metrics(0.25, "oneshot")["allocation_search"]
    assert metrics["kept_candidate"] == kept["candidate"] and metrics["best_candidate"] == best["candidate"]
    assert metrics["flat_held_out"] == result.trials[0]["held_out"]
    assert metrics["held_out_gain_se"] == 0.0  # one held-out window: no spread to measure


def test_too_few_calibration_windows_to_hold_one_out_are_refused() -> None:
    params = {"prune": {"allocation": "search"}, "calibrate": {"samples": 3}}
    with pytest.raises(ParamsError, match=r"key 'prune.search.holdout': 0.25 holds out none of the 3 windows; give "
                                          r"more windows \(calibrate.samples\)"):  # fmt: skip
        check_choices(parse_params(params))
    check_choices(parse_params(params | {"calibrate": {"samples": 4}}))


def _disk_writes(monkeypatch) -> list[str]:
    """Records every hidden-state batch written to disk (the spill of prunekit.models.hidden)."""
    import safetensors.torch

    written: list[str] = []
    save = safetensors.torch.save_file

    def spy(tensors, path, *args, **kwargs):
        written.append(str(path))
        return save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    return written


@pytest.mark.parametrize("objective", ["kl", "loss"])
def test_the_objective_streamed_from_disk_equals_the_in_memory_one(objective: str, monkeypatch) -> None:
    """With no memory for hidden states the unpruned model's reference goes to disk a batch at a time; every
    candidate's objective is the same number as with the reference in memory."""
    model = _model()
    req = _request(model)
    scores = _scores(model)
    plans = [plan_of_counts(scores, req, Space(req, 0.9, 2).counts(p), "search")
             for p in ([0.2, 1.0, 1.0, 0.3, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0])]  # fmt: skip
    adapter = adapter_for(model.config)
    in_memory = candidate_objective(model, adapter, CALIB, 4, objective)
    want = [in_memory(p) for p in plans]
    written = _disk_writes(monkeypatch)
    streamed = candidate_objective(model, adapter, CALIB, 4, objective, activations_mib=0)
    assert [streamed(p) for p in plans] == want
    assert len(written) == (2 if objective == "kl" else 0)  # two batches of the reference, written once


def test_a_refit_inside_the_search_never_sees_the_held_out_windows() -> None:
    """With reconstruction inside the objective and window 3 held out, the kept candidate is the model refit on
    windows 0, 1, 2, 4, 5 alone: its recorded objective is that model's KL there and its held-out figure the same
    model's KL on window 3 (a refit on all six windows gives other numbers)."""
    from prunekit.pruning.reconstruction import RefitChoice, reconstruct

    dense = _model()
    result = prune_model(_job(copy.deepcopy(dense), reconstruct="least_squares", candidates=4, holdout=0.25),
                         "oneshot")  # fmt: skip
    rest, held = CALIB[[0, 1, 2, 4, 5]], CALIB[[3]]
    (kept,) = [t for t in result.trials if t["kept"]]
    adapter = adapter_for(dense.config)

    def refit_on(tokens: torch.Tensor) -> torch.nn.Module:
        model = copy.deepcopy(dense)
        reconstruct(model, adapter, result.plan, tokens, 3, RefitChoice((0.0,), 0.0))
        return apply_plan(model, adapter, result.plan, mode="slice")

    def kl(model, tokens: torch.Tensor) -> float:
        with torch.no_grad():
            p = F.log_softmax(dense(input_ids=tokens).logits[:, :-1].double(), -1)
            q = F.log_softmax(model(input_ids=tokens).logits[:, :-1].double(), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    on_rest, on_all = refit_on(rest), refit_on(CALIB)
    assert kl(on_rest, rest) == pytest.approx(kept["objective"], rel=1e-4)
    assert kl(on_all, rest) != pytest.approx(kept["objective"], rel=1e-3)
    if "held_out" in kept:
        assert kl(on_rest, held) == pytest.approx(kept["held_out"], rel=1e-4)


def test_the_search_mixes_hidden_channels_with_per_layer_units_on_the_target() -> None:
    """Hidden channels (one width for the whole model, no depth profile) in the search beside KV groups and MLP
    channels: every candidate's kept counts remove the target within the tolerance, counted exactly (the sliced
    model of every candidate has the parameters the count says), some candidates cut the hidden width and others
    trade it for per-layer units, and the plan slices to a model equal to the masked dense one."""
    units = [*UNITS, "hidden_channel"]
    dense = _model()
    adapter = adapter_for(dense.config)
    scores = CRITERIA.get("l2").score(dense, adapter, ScoreRequest(units, LAYERS, CALIB, 3, seed=0))
    settings = AllocationSearchParams(candidates=6, random_starts=3, knots=2, holdout=0.0)
    round_to = {"mlp_channel": 4, "hidden_channel": 2}
    cut = Cut(0.25, units, "search", "l2", 1, 1, round_to, 0.02, search=settings)  # fmt: skip
    job = PruneJob(copy.deepcopy(dense), None, adapter, scores, cut, seed=3, calibration=lambda: CALIB,
                   score_batch_size=3)  # fmt: skip
    result = prune_model(job, "oneshot")
    req = PlanRequest(0.25, count_params(dense), layouts(dense, adapter, units, LAYERS), round_to, 0.02)
    space = Space(req, settings.max_ratio, settings.knots)
    # The hidden width has no depth profile: only the per-layer types have knots (and shares relative to it).
    assert [n for n in space.names if "hidden" in n] == [] and "share.mlp_channel" in space.names
    widths = set()
    for trial in result.trials:
        counts = space.counts([trial[n] for n in space.names])
        plan = plan_of_counts(scores, req, counts, "search")
        sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
        assert count_params(sliced) == plan.params_after  # the overlap of hidden and per-layer cuts counted once
        assert abs(plan.achieved - 0.25) <= 0.02
        widths.add(counts[("hidden_channel", 0)])
    assert len(widths) > 1 and min(widths) < 48  # the search moves the hidden width
    assert count_params(result.model) == result.plan.params_after and abs(result.plan.achieved - 0.25) <= 0.02
    masked = apply_plan(copy.deepcopy(dense), adapter, result.plan, mode="mask")
    with torch.no_grad():
        want, got = masked(input_ids=CALIB).logits, result.model(input_ids=CALIB).logits
    assert (got - want).abs().max().item() <= 1e-4  # float32 rounding of the rescaled norms
