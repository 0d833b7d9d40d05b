"""Least-squares reconstruction (prune.reconstruct): the closed form, its guarantees, and the sliced model."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from conftest import tiny_model

from prunekit.errors import ParamsError
from prunekit.models.families import adapter_for
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.validation import check_choices
from prunekit.pruning.plan import Plan
from prunekit.pruning.reconstruction import RefitChoice, reconstruct
from prunekit.pruning.slicing import apply_plan

CALIB = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1))
# Of 16 windows at prune.reconstruct_holdout 0.25, 3, 7, 11 and 15 judge the refit model; the refit has the rest.
FIT_16 = [w for w in range(16) if w not in (3, 7, 11, 15)]


def model64(**overrides: object):
    return tiny_model(**overrides).double().eval()


def plan_of(keep: dict[str, dict[int, list[int]]]) -> Plan:
    return Plan(keep=keep, params_before=0, params_after=0, target=0.0, allocation="uniform", criterion="test")


def layer_inputs(model, idx: int, module: str) -> torch.Tensor:
    """The input of ``model.layers[idx].<module>`` over the calibration windows, (tokens, in_features)."""
    seen = []
    target = model.model.layers[idx].get_submodule(module)
    handle = target.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=CALIB)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "unit,module,kept",
    [("attn_kv_group", "self_attn.o_proj", [0, 2]), ("mlp_channel", "mlp.down_proj", list(range(0, 64, 2)))],
)
def test_one_layer_equals_the_closed_form(unit: str, module: str, kept: list[int], bias: bool) -> None:
    """Layer 1 alone pruned: its inputs are the dense model's, so W' is lstsq(X_p[:, K], X_d W^T + b) with the
    ridge rows sqrt(lam) I -> sqrt(lam) W[:, K]^T, computed here on the data matrices with torch.linalg."""
    extra = {"attention_bias": True, "mlp_bias": True} if bias else {}
    dense = model64(**extra)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    plan = plan_of({unit: {1: kept}})
    ridge = 0.05
    reconstruct(model, adapter, plan, CALIB, 8, RefitChoice((ridge,), 0.0))

    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    xd, xp = layer_inputs(dense, 1, module), layer_inputs(masked, 1, module)
    proj = dense.model.layers[1].get_submodule(module)
    w = proj.weight.detach()
    cols = (masked.model.layers[1].get_submodule(module).weight.abs().sum(0) != 0).nonzero().squeeze(1)
    a = xp[:, cols]
    target = xd @ w.T + (proj.bias.detach() if bias else 0)
    lam = ridge * (a * a).sum(0).mean()
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    damp = torch.zeros(a.shape[1], dtype=a.dtype)
    damp[: cols.numel()] = lam.sqrt()
    prior = w[:, cols].T if not bias else torch.cat([w[:, cols].T, proj.bias.detach().unsqueeze(0)])
    expected = torch.linalg.lstsq(
        torch.cat([a, torch.diag(damp)]), torch.cat([target, damp.unsqueeze(1) * prior])
    ).solution
    got = model.model.layers[1].get_submodule(module)
    torch.testing.assert_close(got.weight.detach()[:, cols], expected[: cols.numel()].T, rtol=1e-7, atol=1e-9)
    if bias:
        torch.testing.assert_close(got.bias.detach(), expected[-1], rtol=1e-7, atol=1e-9)


def test_a_reference_model_gives_the_targets_and_the_refit_model_the_prior() -> None:
    """reconstruct(..., reference=dense) on a model whose weights moved (as LoRA training under masks moves them):
    the targets are the reference layer's projection outputs on the refit model's own layer inputs, the ridge
    pulls towards the refit model's weights: W' = lstsq([X_pK; sqrt(lam) I], [X_r W_r^T; sqrt(lam) W_m[:, K]^T])."""
    dense = model64()
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    adapter = adapter_for(model.config)
    plan = plan_of({"attn_kv_group": {1: [1, 3]}})
    moved = copy.deepcopy(model)
    ridge = 0.05
    fits = reconstruct(model, adapter, plan, CALIB, 8, RefitChoice((ridge,), 0.0), reference=dense)
    assert all(f.error_reconstructed <= f.error_sliced for f in fits)

    module = "self_attn.o_proj"
    masked = apply_plan(copy.deepcopy(moved), adapter, plan, mode="mask")
    hybrid = copy.deepcopy(moved)  # the moved model's layer 0, the reference's layer 1: X_r on the model's inputs
    hybrid.model.layers[1] = copy.deepcopy(dense.model.layers[1])
    xr, xp = layer_inputs(hybrid, 1, module), layer_inputs(masked, 1, module)
    w_r = dense.model.layers[1].get_submodule(module).weight.detach()
    w_m = moved.model.layers[1].get_submodule(module).weight.detach()
    cols = (masked.model.layers[1].get_submodule(module).weight.abs().sum(0) != 0).nonzero().squeeze(1)
    a = xp[:, cols]
    lam = ridge * (a * a).sum(0).mean()
    expected = torch.linalg.lstsq(
        torch.cat([a, lam.sqrt() * torch.eye(cols.numel(), dtype=a.dtype)]),
        torch.cat([xr @ w_r.T, lam.sqrt() * w_m[:, cols].T]),
    ).solution
    got = model.model.layers[1].get_submodule(module).weight.detach()[:, cols]
    torch.testing.assert_close(got, expected.T, rtol=1e-7, atol=1e-9)
    # Not the same as refitting the moved model towards itself.
    alone = copy.deepcopy(moved)
    reconstruct(alone, adapter, plan, CALIB, 8, RefitChoice((ridge,), 0.0))
    assert not torch.allclose(alone.model.layers[1].get_submodule(module).weight[:, cols], got, atol=1e-4)


def test_every_kept_channel_and_zero_ridge_reproduce_the_dense_layers() -> None:
    dense = model64()
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    plan = plan_of({"attn_kv_group": {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, "mlp_channel": {1: list(range(64))}})
    fits = reconstruct(model, adapter, plan, CALIB, 8, RefitChoice((0.0,), 0.0))
    assert {(f.layer, f.projection) for f in fits} == {(i, p) for i in (1, 2) for p in ("o_proj", "down_proj")}
    for (name, p), q in zip(dense.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-9, msg=name)
    assert all(f.error_reconstructed <= 1e-12 * f.target_norm for f in fits)


def test_no_layer_error_grows_and_the_sliced_model_is_the_refit_masked_one() -> None:
    dense = model64()
    adapter = adapter_for(dense.config)
    keep = {
        "attn_query_head": {1: [0, 2, 4, 6], 2: [1, 3, 5, 7]},
        "attn_kv_group": {2: [0, 1, 3]},
        "mlp_channel": {1: list(range(40)), 2: list(range(1, 64, 3))},
    }
    plan = plan_of(keep)
    refit = copy.deepcopy(dense)
    fits = reconstruct(refit, adapter, plan, CALIB, 8, RefitChoice((0.5,), 0.0))
    assert len(fits) == 4 and all(f.error_reconstructed <= f.error_sliced for f in fits)
    assert sum(f.error_reconstructed for f in fits) < 0.9 * sum(f.error_sliced for f in fits)
    masked = apply_plan(copy.deepcopy(refit), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(refit), adapter, plan, mode="slice")
    with torch.no_grad():
        torch.testing.assert_close(sliced(input_ids=CALIB).logits, masked(input_ids=CALIB).logits, rtol=1e-7, atol=1e-9)
    # Without reconstruction the pruned model is further from the dense one on the calibration windows.
    plain = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    with torch.no_grad():
        reference = dense(input_ids=CALIB).logits
        assert (sliced(input_ids=CALIB).logits - reference).norm() < (plain(input_ids=CALIB).logits - reference).norm()


@pytest.mark.parametrize("bias", [False, True])
def test_a_refit_writes_only_the_parameters_an_undone_refit_restores(bias: bool) -> None:
    """An undone refit restores refit_parameters only (not a copy of the whole model): every parameter the refit
    changes must be among them, and they must be the consumer projections of each layer, bias included."""
    from prunekit.pruning.reconstruction import refit_parameters

    dense = model64(attention_bias=bias, mlp_bias=bias)
    refit = copy.deepcopy(dense)
    adapter = adapter_for(refit.config)
    plan = plan_of({"attn_query_head": {1: [0, 2, 4, 6]}, "mlp_channel": {1: list(range(40)), 2: list(range(20))}})
    fits = reconstruct(refit, adapter, plan, CALIB, 8, RefitChoice((0.5,), 0.0))
    refit_ones = {(f.layer, f.projection) for f in fits if f.ridge is not None}
    assert {(1, "o_proj"), (1, "down_proj"), (2, "down_proj")} <= refit_ones  # layer 2 keeps every o_proj input
    restored = {id(p) for p in refit_parameters(refit, adapter)}
    names = {n for n, p in refit.named_parameters() if id(p) in restored}
    layers = refit.config.num_hidden_layers
    suffixes = ("weight", "bias") if bias else ("weight",)
    expected = {f"model.layers.{i}.{m}.{s}" for i in range(layers) for m in ("self_attn.o_proj", "mlp.down_proj")
                for s in suffixes}  # fmt: skip
    assert names == expected
    changed = {
        n for (n, p), q in zip(dense.named_parameters(), refit.parameters(), strict=True) if not torch.equal(p, q)
    }
    assert changed and changed <= names


def test_params_refuse_what_reconstruction_cannot_follow() -> None:
    with pytest.raises(ParamsError, match="prune.reconstruct': refits the biases too"):
        check_choices(parse_params({"prune": {"reconstruct": "least_squares", "bias_compensation": True},
                                    "score": {"criterion": "flap"}}))  # fmt: skip
    # Every schedule reconstructs (the iterative one after its last mask).
    check_choices(parse_params({"prune": {"reconstruct": "least_squares", "schedule": "iterative",
                                          "allocation": "uniform"}, "score": {"criterion": "lora"}}))  # fmt: skip
    with pytest.raises(ParamsError, match="prune.reconstruct"):
        parse_params({"prune": {"reconstruct": "lstsq"}})


def activation_scored(tokenizer) -> tuple[Any, Any, torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """A tiny dense model, its adapter, 16 calibration windows of 16 tokens, and the activation scores of its KV
    groups and MLP channels in layers 1 and 2 on them."""
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest

    dense = tiny_model(vocab_size=len(tokenizer)).eval()
    adapter = adapter_for(dense.config)
    calibration = torch.randint(0, len(tokenizer), (16, 16), generator=torch.Generator().manual_seed(2))
    units = ["attn_kv_group", "mlp_channel"]
    scores = CRITERIA.get("activation").score(dense, adapter, ScoreRequest(units, [1, 2], calibration, 4, seed=1))
    return dense, adapter, calibration, units, scores


@pytest.mark.parametrize("schedule", ["oneshot", "kshot"])
def test_the_schedules_reconstruct_when_asked(schedule: str, tokenizer) -> None:
    from prunekit.pipeline.params import ScheduleParams
    from prunekit.pruning.schedules import Cut, PruneJob, prune_model

    dense, adapter, calibration, units, scores = activation_scored(tokenizer)

    def run(reconstruct: str):
        # Any held-out gain keeps the refit model (the two-standard-error judgement is tested below).
        cut = Cut(0.12, units, "uniform", "activation", 1, 1, {}, 0.05, reconstruct=reconstruct,
                  reconstruct_standard_errors=0.0)  # fmt: skip
        job = PruneJob(copy.deepcopy(dense), tokenizer, adapter, scores, cut, seed=0, schedule=ScheduleParams(
            shots=2, steps_per_shot=0), calibration=lambda: calibration, training_blocks=lambda n: calibration,
            score_batch_size=4)  # fmt: skip
        return prune_model(job, schedule)

    plain, refit = run("none"), run("least_squares")
    if schedule == "oneshot":
        assert plain.plan.keep == refit.plan.keep  # the same cut, other weights (kshot rescores the refit model)
        summary = refit.metrics(0.12, schedule)["reconstruction"]
        assert summary["projections"] == 4 and summary["error_reconstructed"] < summary["error_sliced"]
        expected = copy.deepcopy(dense)  # refit without windows 3, 7, 11, 15, which judge it (and keep it here)
        reconstruct(expected, adapter, refit.plan, calibration[FIT_16], 4, RefitChoice())
        apply_plan(expected, adapter, refit.plan, mode="slice")
        for (name, p), q in zip(expected.named_parameters(), refit.model.parameters(), strict=True):
            assert torch.equal(p, q), name
    else:
        assert all(r["reconstruction"]["error_reconstructed"] <= r["reconstruction"]["error_sliced"]
                   for r in refit.log)  # fmt: skip
    with torch.no_grad():
        reference = dense(input_ids=calibration).logits
        err = {
            k: (m.model(input_ids=calibration).logits - reference).norm() for k, m in (("plain", plain), ("ls", refit))
        }
    assert err["ls"] < err["plain"]


def test_reconstruction_refits_on_training_windows_when_asked(tokenizer) -> None:
    """prune.reconstruct_samples: the refit uses that many training-text windows (a seeded choice of the
    non-overlapping blocks), not the calibration windows; too few blocks is refused with the key to change."""
    from prunekit.errors import PrunekitError
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.schedules import Cut, PruneJob, prune_model

    dense = tiny_model(vocab_size=len(tokenizer)).eval()
    adapter = adapter_for(dense.config)
    calibration = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(2))
    training = torch.randint(0, len(tokenizer), (20, 24), generator=torch.Generator().manual_seed(3))
    units = ["attn_kv_group", "mlp_channel"]
    scores = CRITERIA.get("activation").score(dense, adapter, ScoreRequest(units, [1, 2], calibration, 4, seed=1))
    seen_lengths = []

    def blocks(seq_len: int) -> torch.Tensor:
        seen_lengths.append(seq_len)
        return training

    cut = Cut(0.12, units, "uniform", "activation", 1, 1, {}, 0.05, reconstruct="least_squares",
              reconstruct_ridge=(0.01, 1.0), reconstruct_samples=8, reconstruct_seq_len=24,
              reconstruct_standard_errors=0.0)  # fmt: skip
    job = PruneJob(copy.deepcopy(dense), tokenizer, adapter, scores, cut, seed=5, calibration=lambda: calibration,
                   training_blocks=blocks, score_batch_size=4)  # fmt: skip
    chosen = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:8].sort().values
    assert torch.equal(job.reconstruction_tokens(), training[chosen]) and seen_lengths == [24]
    result = prune_model(job, "oneshot")
    expected = copy.deepcopy(dense)
    fitted = training[chosen][[0, 1, 2, 4, 5, 6]]  # of the 8 windows, 3 and 7 judge the refit model
    reconstruct(expected, adapter, result.plan, fitted, 4, RefitChoice((0.01, 1.0), 0.25))
    apply_plan(expected, adapter, result.plan, mode="slice")
    for (name, p), q in zip(expected.named_parameters(), result.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    job.cut = dataclasses.replace(cut, reconstruct_samples=21)
    with pytest.raises(PrunekitError, match=r"prune.reconstruct_samples=21: the training text holds only 20"):
        job.reconstruction_tokens()


def test_the_held_out_windows_are_the_share_asked_spread_evenly() -> None:
    assert [w for w in range(12) if RefitChoice(holdout=0.25).held_out(w)] == [3, 7, 11]
    assert [w for w in range(10) if RefitChoice(holdout=0.5).held_out(w)] == [1, 3, 5, 7, 9]
    assert sum(RefitChoice(holdout=0.3).held_out(w) for w in range(100)) == 30
    assert not any(RefitChoice(holdout=0.0).held_out(w) for w in range(100))


def ridge_lstsq(a: torch.Tensor, target: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """min ||a x - target||^2 + lam ||x - prior||^2, lam = ridge * mean diag(a^T a), by lstsq on stacked rows."""
    lam = ridge * (a * a).sum(0).mean()
    eye = lam.sqrt() * torch.eye(a.shape[1], dtype=a.dtype)
    return torch.linalg.lstsq(torch.cat([a, eye]), torch.cat([target, lam.sqrt() * prior])).solution


@pytest.mark.parametrize("unit,module,kept", [("attn_kv_group", "self_attn.o_proj", [0, 2]),
                                              ("mlp_channel", "mlp.down_proj", list(range(0, 64, 3)))])  # fmt: skip
def test_the_ridge_is_chosen_on_the_held_out_windows_and_refit_on_all(unit: str, module: str, kept: list[int]) -> None:
    """Layer 1 alone pruned, a quarter of the windows held out (3, 7, ...: rows 16 w .. 16 w + 15 of the data
    matrices): each ridge fitted on the other windows, judged on these, the best one refit on every window; the
    errors recorded are the held-out ones. Computed here with torch.linalg on the data matrices."""
    dense = model64()
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    plan = plan_of({unit: {1: kept}})
    ridges = (1e-4, 0.03, 1.0, 30.0)
    (fit,) = [f for f in reconstruct(model, adapter, plan, CALIB, 8, RefitChoice(ridges, 0.25)) if module.endswith(
        f.projection)]  # fmt: skip

    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    xd, xp = layer_inputs(dense, 1, module), layer_inputs(masked, 1, module)
    w = dense.model.layers[1].get_submodule(module).weight.detach()
    cols = (masked.model.layers[1].get_submodule(module).weight.abs().sum(0) != 0).nonzero().squeeze(1)
    a, target, prior = xp[:, cols], xd @ w.T, w[:, cols].T
    held = (torch.arange(a.shape[0]) // CALIB.shape[1]) % 4 == 3
    errors = {r: float(((a[held] @ ridge_lstsq(a[~held], target[~held], prior, r) - target[held]) ** 2).sum())
              for r in ridges}  # fmt: skip
    sliced_error = float(((a[held] @ prior - target[held]) ** 2).sum())
    best = min(errors, key=errors.get)
    assert errors[best] < sliced_error  # this cut's refit pays on the held-out windows
    assert fit.ridge == best and fit.error_reconstructed == pytest.approx(errors[best], rel=1e-6)
    assert fit.error_sliced == pytest.approx(sliced_error, rel=1e-6)
    expected = ridge_lstsq(a, target, prior, best)
    got = model.model.layers[1].get_submodule(module).weight.detach()[:, cols]
    torch.testing.assert_close(got, expected.T, rtol=1e-7, atol=1e-9)


def synthetic_gram(x: torch.Tensor, target: torch.Tensor) -> Any:
    """A projection's statistics for inputs ``x`` whose dense outputs are ``target`` (dense weight: identity)."""
    from prunekit.pruning.reconstruction import _Gram

    gram = _Gram(torch.eye(x.shape[1], dtype=torch.float64), None)
    gram.add(x, target)
    return gram


def test_a_refit_that_overfits_keeps_the_sliced_weights_and_the_held_out_choice_picks_the_ridge() -> None:
    """Built so that the refit overfits: 12 fitting tokens for 16 inputs, their targets noisy. Where the sliced
    weights are the truth, every refit is worse on the held-out tokens and the sliced weights stay (judged on the
    fitting tokens, the refit would win); where the truth lies between, the ridge with the least held-out error
    wins, a larger one than the fitting tokens prefer."""
    from prunekit.pruning.reconstruction import solve

    gen = torch.Generator().manual_seed(0)
    n, keep, ridges = 16, torch.ones(16, dtype=torch.bool), (1e-6, 0.01, 0.1, 1.0, 10.0)
    x_fit = torch.randn(12, n, generator=gen, dtype=torch.float64)
    x_held = torch.randn(64, n, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(12, n, generator=gen, dtype=torch.float64)
    prior = torch.eye(n, dtype=torch.float64)  # the sliced weights: the dense identity

    truth = prior  # the sliced weights are right, the fitting targets noisy
    fit, held = synthetic_gram(x_fit, x_fit @ truth.T + noise), synthetic_gram(x_held, x_held @ truth.T)
    weight, _, (e_sliced, e_refit, _), ridge = solve(fit, held, prior, None, keep, ridges)
    assert ridge is None and torch.equal(weight, prior) and e_refit == e_sliced == pytest.approx(0.0, abs=1e-9)
    _, _, (e_sliced_fit, e_refit_fit, _), ridge_fit = solve(fit, None, prior, None, keep, ridges)
    assert ridge_fit == ridges[0] and e_refit_fit < 0.01 * e_sliced_fit  # on its own tokens the refit looks right

    truth = prior + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    fit, held = synthetic_gram(x_fit, x_fit @ truth.T + noise), synthetic_gram(x_held, x_held @ truth.T)
    weight, _, (e_sliced, e_refit, _), ridge = solve(fit, held, prior, None, keep, ridges)
    errors = {r: float(((x_held @ ridge_lstsq(x_fit, x_fit @ truth.T + noise, prior.T, r) - x_held @ truth.T) ** 2)
                       .sum()) for r in ridges}  # fmt: skip
    best = min(errors, key=errors.get)
    assert ridge == best and best > ridges[0] and e_refit == pytest.approx(errors[best], rel=1e-6)
    assert e_refit < e_sliced
    x_all, t_all = torch.cat([x_fit, x_held]), torch.cat([x_fit @ truth.T + noise, x_held @ truth.T])
    torch.testing.assert_close(weight, ridge_lstsq(x_all, t_all, prior.T, best).T, rtol=1e-7, atol=1e-9)


def test_too_few_windows_to_hold_one_out_are_refused_with_the_keys() -> None:
    from prunekit.errors import PrunekitError

    model = model64()
    plan = plan_of({"mlp_channel": {1: list(range(32))}})
    with pytest.raises(PrunekitError, match=r"prune.reconstruct_holdout: 0.25 holds out none of the 3 windows"):
        reconstruct(model, adapter_for(model.config), plan, CALIB[:3], 8, RefitChoice((0.1,), 0.25))
    # The params check says so before any work: the windows are calibrate.samples or prune.reconstruct_samples.
    refused = {
        "prune": {"reconstruct": "least_squares", "reconstruct_samples": 3},
        "score": {"criterion": "activation"},
    }
    # Two held-out sets: 0.25 of the windows judge the refit model, 0.25 of the rest choose the ridges: 4 windows
    # give the first one window and the second none.
    for windows in (3, 4):
        refused["prune"]["reconstruct_samples"] = windows
        problem = rf"0.25 of the {windows} windows, then of the rest, leaves one of the two held-out sets empty"
        with pytest.raises(ParamsError, match=r"key 'prune.reconstruct_holdout': " + problem):
            check_choices(parse_params(refused))
    check_choices(parse_params(refused | {"prune": {"reconstruct": "least_squares", "reconstruct_samples": 5}}))
    check_choices(parse_params(refused | {"prune": {"reconstruct": "least_squares", "reconstruct_samples": 3,
                                                    "reconstruct_holdout": 0.0}}))  # fmt: skip


def test_reconstruction_streamed_from_disk_equals_the_in_memory_one(monkeypatch) -> None:
    """The calibration hidden states of each layer go to disk a batch at a time when no memory is allowed for them;
    the Gram matrices, and so every refit weight and every recorded error, are the same as with them in memory."""
    import safetensors.torch

    dense = model64()
    adapter = adapter_for(dense.config)
    plan = plan_of({"attn_kv_group": {1: [0, 2], 2: [1, 3]}, "mlp_channel": {1: list(range(0, 64, 2))}})
    choice = RefitChoice((0.01, 0.3), 0.25)
    in_memory = copy.deepcopy(dense)
    want = reconstruct(in_memory, adapter, plan, CALIB, 8, choice)
    written: list[str] = []
    save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda t, p, *a, **k: (written.append(p), save(t, p, *a, **k)))
    streamed = copy.deepcopy(dense)
    got = reconstruct(streamed, adapter, plan, CALIB, 8, choice, activations_mib=0)
    assert got == want
    for (name, a), b in zip(in_memory.state_dict().items(), streamed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    layers = len(adapter.layers(dense))
    assert len(written) == 4 * (1 + layers)  # 4 batches: layer 0's inputs, then each layer's outputs


def _held_out_kls(teacher, student, adapter, plan, tokens: torch.Tensor) -> list[float]:
    """Per window: KL(p_teacher || p_student sliced by ``plan``) per position, from the full logits."""
    import torch.nn.functional as F

    sliced = apply_plan(copy.deepcopy(student), adapter, plan, mode="slice")
    with torch.no_grad():
        p = F.log_softmax(teacher(input_ids=tokens).logits[:, :-1].double(), -1)
        q = F.log_softmax(sliced(input_ids=tokens).logits[:, :-1].double(), -1)
    return [float(v) for v in (p.exp() * (p - q)).sum(-1).mean(-1)]


def test_the_refit_model_is_kept_only_if_it_beats_the_sliced_one_on_the_held_out_windows(tokenizer) -> None:
    """prune.reconstruct_holdout 0.25 of 16 windows: 3, 7, 11 and 15 judge the refit model as a whole (refit on the
    others, which hold out their own share to choose the ridges). Its KL from
    the dense model on each of them and the sliced model's (computed independently) give a mean gain of g standard
    errors; with prune.reconstruct_standard_errors below g the cut is the refit model, above it the plainly sliced
    one, bit for bit, and the metrics count no refit projection."""
    from prunekit.pruning.holdout import held_out_gain
    from prunekit.pruning.schedules import Cut, PruneJob, prune_model

    dense, adapter, calibration, units, scores = activation_scored(tokenizer)

    def run(standard_errors: float):
        cut = Cut(0.12, units, "uniform", "activation", 1, 1, {}, 0.05, reconstruct="least_squares",
                  reconstruct_standard_errors=standard_errors)  # fmt: skip
        job = PruneJob(copy.deepcopy(dense), tokenizer, adapter, scores, cut, calibration=lambda: calibration,
                       score_batch_size=4)  # fmt: skip
        return prune_model(job, "oneshot")

    any_gain = run(0.0)
    refit = copy.deepcopy(dense)
    fits = reconstruct(refit, adapter, any_gain.plan, calibration[FIT_16], 4, RefitChoice())
    assert any(f.ridge is not None for f in fits)
    held = calibration[[3, 7, 11, 15]]
    gain, error = held_out_gain(*(_held_out_kls(dense, m, adapter, any_gain.plan, held) for m in (dense, refit)))
    assert gain > 0 and error > 0  # this case: the refit wins, by a measurable margin
    sliced = apply_plan(copy.deepcopy(dense), adapter, any_gain.plan, mode="slice")
    refit_sliced = apply_plan(refit, adapter, any_gain.plan, mode="slice")
    refit_projections = sum(f.ridge is not None for f in fits)
    for standard_errors, expected, refit_count in ((0.0, refit_sliced, refit_projections),
                                                   (0.9 * gain / error, refit_sliced, refit_projections),
                                                   (1.1 * gain / error, sliced, 0)):  # fmt: skip
        result = any_gain if standard_errors == 0.0 else run(standard_errors)
        assert result.plan.keep == any_gain.plan.keep
        for (name, p), q in zip(expected.named_parameters(), result.model.parameters(), strict=True):
            assert torch.equal(p, q), (standard_errors, name)
        summary = result.metrics(0.12, "oneshot")["reconstruction"]
        assert summary["refit"] == refit_count
        assert (summary["error_reconstructed"] == summary["error_sliced"]) == (refit_count == 0)
