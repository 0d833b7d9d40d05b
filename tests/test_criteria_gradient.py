"""Gradient criteria (LLM-Pruner's Taylor variants, LoRAPrune's ``lora``) against independent autograd.

Every expected score is computed here from plain autograd on a fresh copy of the tiny model, with the
unit blocks cut by hand (``unit_slices`` from test_criteria), never through the unit/member machinery.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from test_criteria import _grads_as_model, request, unit_slices

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.pipeline.params import ScoreParams
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.criteria import lora as lora_module

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Rank 4, s = alpha / r = 2, a learning rate large enough that 3 Adam steps make B clearly nonzero.
LORA = {"rank": 4, "alpha": 8.0, "steps": 3, "learning_rate": 1e-2, "batch_size": 4, "target_modules": TARGETS}
LORA_OPTS = ScoreParams.model_validate({"lora": LORA})


def _tensor_model(model, tensors: dict[str, torch.Tensor]):
    """``_grads_as_model`` for arbitrary per-parameter tensors (by name): set them as .grad, copy, clear."""
    for name, p in model.named_parameters():
        p.grad = tensors.get(name)
    out = _grads_as_model(model)
    model.zero_grad(set_to_none=True)
    return out


def _expected(models: dict[str, torch.nn.Module], layers, fn) -> dict[str, torch.Tensor]:
    """Per unit: ``fn`` of its blocks, one block dict per model in ``models`` (same keys as unit_slices)."""
    out = {}
    for idx in layers:
        cut = {k: unit_slices(m, idx) for k, m in models.items()}
        for unit in cut["w"]:
            blocks = [{k: cut[k][unit][u] for k in models} for u in range(len(cut["w"][unit]))]
            out[f"{unit}.{idx}"] = torch.tensor([fn(b) for b in blocks], dtype=torch.float64)
    return out


def _mean_grad_and_fisher(calibration: torch.Tensor):
    """(weights, g, F) as models: g from ONE backward of the mean NLL over all windows, F = mean_s g_s^2."""
    ref = tiny_model()
    ref(input_ids=calibration, labels=calibration).loss.backward()
    g = _grads_as_model(ref)
    ref.zero_grad(set_to_none=True)
    n = calibration.shape[0]
    fisher = {name: torch.zeros_like(p) for name, p in ref.named_parameters()}
    for s in range(n):
        ref.zero_grad(set_to_none=True)
        x = calibration[s : s + 1]
        ref(input_ids=x, labels=x).loss.backward()
        for name, p in ref.named_parameters():
            fisher[name] += p.grad.pow(2) / n
    return ref, g, _tensor_model(ref, fisher)


def _block_sum(blocks: dict[str, dict[str, torch.Tensor]], fn) -> float:
    """Sum over a unit's blocks (q/k/v/o or g/u/d) of fn(w, g, f) summed over elements, in float64."""
    w, g, f = blocks["w"], blocks["g"], blocks["f"]
    return sum(fn(w[k].double(), g[k].double(), f[k].double()).sum().item() for k in w)


TAYLOR_FORMULAS = {
    "vectorize": lambda b: abs(_block_sum(b, lambda w, g, f: w * g)),
    "param_second": lambda b: _block_sum(b, lambda w, g, f: w * f * w),
    "param_mix": lambda b: _block_sum(b, lambda w, g, f: (w * g - 0.5 * w * f * w).abs()),
    "param_first": lambda b: _block_sum(b, lambda w, g, f: (w * g).abs()),
}


@pytest.mark.parametrize("name", sorted(TAYLOR_FORMULAS))
def test_taylor_variants_equal_autograd(name: str) -> None:
    model = tiny_model()
    req = request(model)
    scores = CRITERIA.get(name).score(model, adapter_for(model.config), req)
    w, g, f = _mean_grad_and_fisher(req.calibration)
    expected = _expected({"w": w, "g": g, "f": f}, req.layers, TAYLOR_FORMULAS[name])
    assert sorted(scores) == sorted(expected)
    for key, exp in expected.items():
        torch.testing.assert_close(scores[key], exp, rtol=1e-4, atol=1e-10)


def test_fisher_is_per_sample_not_squared_mean_gradient() -> None:
    """param_second must differ from the same formula with F = g^2 (the batched gradient squared)."""
    model = tiny_model()
    req = request(model)
    scores = CRITERIA.get("param_second").score(model, adapter_for(model.config), req)
    w, g, _ = _mean_grad_and_fisher(req.calibration)
    wrong = _expected({"w": w, "g": g, "f": g}, req.layers, lambda b: _block_sum(b, lambda w, g, f: w * g * g * w))
    assert all(not torch.allclose(scores[k], wrong[k], rtol=1e-2) for k in wrong)


@pytest.mark.parametrize("name", ["param_first", "vectorize", "param_mix", "lora"])
def test_gradient_criteria_leave_flags_and_grads(name: str) -> None:
    """requires_grad flags (mixed on purpose) and existing .grad tensors come back exactly as they were."""
    model = tiny_model()
    params = dict(model.named_parameters())
    for i, p in enumerate(params.values()):
        p.requires_grad_(i % 3 != 0)
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    req = dataclasses.replace(request(model), options=LORA_OPTS)
    CRITERIA.get(name).score(model, adapter_for(model.config), req)
    after = dict(model.named_parameters())
    assert list(after) == list(params) and all(after[n] is params[n] for n in params)
    assert {n: p.requires_grad for n, p in after.items()} == flags
    for i, (n, p) in enumerate(after.items()):
        assert p.grad is grads[n]
        if grads[n] is not None:
            assert torch.all(p.grad == float(i))
        assert torch.equal(p, weights[n])


# ---------------------------------------------------------------- lora


def _lora_request(model) -> ScoreRequest:
    return dataclasses.replace(request(model, seed=3), options=LORA_OPTS)


def test_lora_never_differentiates_base_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """From inside the scoring: base weights never require grad and no gradient reaches them."""
    model = tiny_model()
    base = dict(model.named_parameters())
    for p in base.values():
        p.grad = torch.full_like(p, 7.0)  # a gradient arriving would be added to these in place
    sentinel = {n: p.grad for n, p in base.items()}
    seen: dict[str, object] = {"forwards": 0, "trainable": set()}

    def on_forward(module, args, kwargs) -> None:
        seen["forwards"] += 1
        seen["trainable"] |= {n for n, p in base.items() if p.requires_grad}

    model.model.register_forward_pre_hook(on_forward, with_kwargs=True)
    original = lora_module.accumulate_lm_gradients

    def checked(peft_model, *args, **kwargs) -> None:
        original(peft_model, *args, **kwargs)
        # Adapters still attached, after every training step and the gradient pass.
        seen["touched"] = {n for n, p in base.items() if p.grad is not sentinel[n] or not torch.all(p.grad == 7.0)}
        seen["trainable_now"] = {n for n, p in base.items() if p.requires_grad}
        lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        seen["lora"] = (len(lora), sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora))

    monkeypatch.setattr(lora_module, "accumulate_lm_gradients", checked)
    req = _lora_request(model)
    CRITERIA.get("lora").score(model, adapter_for(model.config), req)
    # 3 training steps + 2 gradient batches (6 windows, batch 4): the hook saw every forward.
    assert seen["forwards"] == LORA["steps"] + 2
    assert seen["trainable"] == set() and seen["trainable_now"] == set() and seen["touched"] == set()
    # 7 targets x 2 layers x (A, B), and every one of them got a nonzero gradient.
    assert seen["lora"] == (28, 28)


def _reference_lora(req: ScoreRequest):
    """Same LoRA model built here (same seed and config), trained the documented way, with G_A, G_B.

    The documented way: AdamW (no weight decay), learning rate decaying linearly to 0 over the steps, batches of
    ``score.lora.batch_size`` windows in a random order drawn from a generator seeded with the request's seed.
    """
    lora = req.options.lora.model_dump()
    ref = tiny_model()
    torch.manual_seed(req.seed)
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=0.0,
        target_modules=TARGETS,
        layers_to_transform=req.layers,
    )
    pm = get_peft_model(ref, config)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lora["learning_rate"], weight_decay=0.0)
    gen, n, bs, steps = (
        torch.Generator().manual_seed(req.seed),
        req.calibration.shape[0],
        lora["batch_size"],
        lora["steps"],
    )
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        b = req.calibration[order[pos : pos + bs]]
        pos += bs
        pm(input_ids=b, labels=b).loss.backward()
        for group in opt.param_groups:
            group["lr"] = lora["learning_rate"] * (steps - step) / steps
        opt.step()
        opt.zero_grad(set_to_none=True)
    # G_A, G_B of the mean NLL over all windows in one batch (the criterion batches; the sum is the same).
    pm(input_ids=req.calibration, labels=req.calibration).loss.backward()
    return ref


def test_lora_scores_equal_independent_computation() -> None:
    model = tiny_model()
    req = _lora_request(model)
    scores = CRITERIA.get("lora").score(model, adapter_for(model.config), req)

    ref = _reference_lora(req)
    s, lr = LORA["alpha"] / LORA["rank"], LORA["learning_rate"]
    importance = {}
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            a, b = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
            ga, gb = mod.lora_A["default"].weight.grad.double(), mod.lora_B["default"].weight.grad.double()
            assert b.abs().min() > 0  # training made B nonzero, so the B @ G_A term is exercised
            g_hat = s * (gb @ a + b @ ga - lr * gb @ ga)
            w = mod.base_layer.weight.double()
            base_name = name.replace("base_model.model.", "", 1) + ".weight"
            importance[base_name] = (g_hat * (w + s * b @ a)).abs().float()
    assert len(importance) == 14
    imp_model = _tensor_model(tiny_model(), importance)
    expected = _expected(
        {"w": imp_model}, req.layers, lambda blk: sum(t.double().sum().item() for t in blk["w"].values())
    )
    assert sorted(scores) == sorted(expected)
    for key, exp in expected.items():
        torch.testing.assert_close(scores[key], exp, rtol=1e-4, atol=1e-12)


def test_lora_on_a_bfloat16_base_keeps_float32_adapters_and_the_ranking() -> None:
    """score.base_dtype=bfloat16: the frozen base is bf16, the adapters and estimates float32, and the scores
    are the float32 base's up to bf16 rounding (>= 90% of each layer's top half shared)."""
    model = tiny_model()
    req = _lora_request(model)
    ref = CRITERIA.get("lora").score(model, adapter_for(model.config), req)
    half = tiny_model().to(torch.bfloat16)
    seen = {}
    original = lora_module.collect_factors

    def spy(m):
        factors = original(m)
        seen["dtypes"] = {f.a.dtype for f in factors.values()} | {f.grad_b.dtype for f in factors.values()}
        return factors

    lora_module.collect_factors, saved = spy, lora_module.collect_factors
    try:
        got = CRITERIA.get("lora").score(half, adapter_for(half.config), req)
    finally:
        lora_module.collect_factors = saved
    assert seen["dtypes"] == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # the base stays as loaded
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0.25, atol=1e-3 * float(ref[key].abs().max()))
        k = ref[key].numel() // 2
        overlap = set(ref[key].topk(k).indices.tolist()) & set(got[key].topk(k).indices.tolist())
        assert len(overlap) >= 0.9 * k, key


def test_lora_estimate_is_the_projected_true_gradient() -> None:
    """With B != 0: G_B = s G A^T, G_A = s B^T G, and the estimate equals
    s^2 (G A^T A + B B^T G) - eta s^3 G A^T B^T G, with G the true gradient of the merged weight."""
    torch.manual_seed(11)
    x = torch.randint(0, 128, (3, 12))
    model = tiny_model()
    pm = get_peft_model(
        model, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    )
    mods = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    with torch.no_grad():
        for m in mods.values():
            m.lora_B["default"].weight.normal_(std=0.2)
    pm(input_ids=x, labels=x).loss.backward()

    # The true gradient: a plain model whose weights ARE the merged weights W + s B A, differentiated directly.
    merged = tiny_model()
    merged.requires_grad_(False)
    for name, m in mods.items():
        w = merged.get_parameter(name + ".weight")
        with torch.no_grad():
            w += m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        w.requires_grad_(True)
    merged(input_ids=x, labels=x).loss.backward()

    eta = 1.0  # LoRAPrune's own value: the second-order term is large enough to be checked
    for name, m in mods.items():
        s = m.scaling["default"]
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        g = merged.get_parameter(name + ".weight").grad.double()
        a64, b64 = a.detach().double(), b.detach().double()
        tol = dict(rtol=1e-3, atol=1e-6 * float(g.abs().max()))
        torch.testing.assert_close(b.grad.double(), s * g @ a64.T, **tol)
        torch.testing.assert_close(a.grad.double(), s * b64.T @ g, **tol)
        est = lora_module.lora_gradient_estimate(a, b, a.grad, b.grad, s, eta).double()
        proj = s**2 * (g @ a64.T @ a64 + b64 @ b64.T @ g) - eta * s**3 * g @ a64.T @ b64.T @ g
        torch.testing.assert_close(est, proj, rtol=1e-3, atol=1e-5 * float(proj.abs().max()))
        # The first-order part lives in A's row space plus B's column space: outside both it vanishes.
        first = lora_module.lora_gradient_estimate(a, b, a.grad, b.grad, s, 0.0).double()
        out_b = torch.eye(b64.shape[0], dtype=torch.float64) - b64 @ torch.linalg.pinv(b64)
        out_a = torch.eye(a64.shape[1], dtype=torch.float64) - torch.linalg.pinv(a64) @ a64
        assert (out_b @ first @ out_a).abs().max() < 1e-5 * first.abs().max()
        assert (out_b @ g @ out_a).abs().max() > 0.1 * g.abs().max()  # ... while the true gradient does not


def test_lora_leaves_model_unchanged() -> None:
    model = tiny_model()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    rng = torch.random.get_rng_state()
    CRITERIA.get("lora").score(model, adapter_for(model.config), _lora_request(model))
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == modules  # adapters unloaded, nothing merged
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)


def test_lora_requires_every_pruned_module_as_target() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opts = ScoreParams.model_validate(
        {"lora": dict(LORA, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])}
    )
    req = dataclasses.replace(request(model), options=opts)
    with pytest.raises(PrunekitError, match=r"miss \['mlp.down_proj', 'self_attn.o_proj'\]"):
        CRITERIA.get("lora").score(model, adapter_for(model.config), req)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("scheme", ["nf4", "int8", "q4_0", "rtn4"])
def test_every_backend_gives_back_the_weight_it_computes_with(scheme: str) -> None:
    """dequantize(realised module) is the scheme's fake-quantized image of the float weight (what the search and
    the lora criterion on a quantized base read)."""
    from prunekit.quant.backend import backend_for, backend_of
    from prunekit.quant.schemes import SCHEMES, QuantSettings

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    s, settings = SCHEMES.get(scheme), QuantSettings(group_size=32)
    module = backend_for(s).realise(linear, s, settings)
    got = backend_of(module).dequantize(module)
    expected = backend_for(s).fake_quantize(linear.weight.detach(), s, settings)
    assert got.shape == (32, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=2e-3 * float(linear.weight.detach().abs().max()))
    assert (got - linear.weight).abs().max() > 0  # a quantized image, not the float weight


@pytest.mark.parametrize("scheme", ["nf4", "rtn4"])
def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(scheme: str) -> None:
    """score.base_quant: LoRAPrune on a frozen quantized base gives the scores of the float criterion on a model
    whose target weights are their dequantized images (same adapters, same steps), and leaves the base quantized."""
    from prunekit.quant.backend import backend_for, is_quantized
    from prunekit.quant.realise import quantize_linears
    from prunekit.quant.schemes import SCHEMES, QuantSettings

    s, settings = SCHEMES.get(scheme), QuantSettings(group_size=16)
    quantized = tiny_model()
    for layer in quantized.model.layers:
        quantize_linears(layer, TARGETS, s, settings)
    image = tiny_model()
    with torch.no_grad():
        for name, module in image.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                module.weight.copy_(backend_for(s).fake_quantize(module.weight, s, settings))
    req = _lora_request(quantized)
    got = CRITERIA.get("lora").score(quantized, adapter_for(quantized.config), req)
    ref = CRITERIA.get("lora").score(image, adapter_for(image.config), req)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-5 * float(ref[key].abs().max()))
    assert all(is_quantized(quantized.model.layers[0].get_submodule(f"self_attn.{p}")) for p in ("q_proj", "o_proj"))


def test_the_score_stage_quantizes_each_layer_as_it_reads_it(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A quantized-base run never holds two float decoder layers: each is quantized before the next is read."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.pipeline.params import parse_params
    from prunekit.pruning.scoring import ModelSource, QuantizedBase, load_quantized_base
    from prunekit.quant.backend import is_quantized
    from prunekit.quant.schemes import QuantSettings

    float_layers_seen = []
    materialize = LayerwiseModel._materialize

    def spy(self, module, prefix):  # noqa: ANN001
        materialize(self, module, prefix)
        float_layers_seen.append(
            sum(isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta" for m in self.model.modules())
        )

    monkeypatch.setattr(LayerwiseModel, "_materialize", spy)
    spec = importlib.util.spec_from_file_location("stage_score", Path(__file__).parents[1] / "stages" / "score.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    params = parse_params({"score": {"criterion": "lora", "base_quant": "rtn4", "lora": LORA}})
    save_file({"input_ids": torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(1))},
              str(tmp_path / "calib.safetensors"))  # fmt: skip
    stage.score(params, tiny_model_dir, tmp_path / "calib.safetensors", tmp_path / "scores.safetensors")
    scores = load_file(str(tmp_path / "scores.safetensors"))
    assert {"attn_kv_group.0", "mlp_channel.3"} <= set(scores) and all(v.isfinite().all() for v in scores.values())
    # At most one layer's 7 target Linears (plus an untied head) are float at any time.
    assert max(float_layers_seen) <= len(TARGETS) + 1
    base = QuantizedBase("rtn4", QuantSettings.from_params(params.quantize), tuple(TARGETS))
    model = load_quantized_base(ModelSource(tiny_model_dir), base)
    assert sum(is_quantized(m) for m in model.modules()) == len(TARGETS) * len(model.model.layers)


@pytest.mark.parametrize(
    ("score", "model", "match"),
    [
        ({"criterion": "lora", "base_quant": "q9_9"}, {}, r"'score.base_quant'.*q9_9"),
        ({"criterion": "param_first", "base_quant": "nf4"}, {}, r"'score.base_quant': 'param_first' reads the fl"),
        ({"criterion": "lora", "base_quant": "nf4"}, {"device_map": "auto"}, r"'score.base_quant'.*device_map"),
    ],
)
def test_a_quantized_base_is_refused_where_it_cannot_work(score, model, match) -> None:
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices

    with pytest.raises(ParamsError, match=match):
        check_choices(parse_params({"score": score, "model": model}))
