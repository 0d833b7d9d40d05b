"""Quantization: RTN against its bound, plans applied exactly, budgets, gradients after eval, save/reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.quant.backend import lora_custom_modules
from prunekit.quant.plan import plan_cost, quant_targets
from prunekit.quant.realise import fake_quantized, logical_param_count, quantized_weight_bytes, realise
from prunekit.quant.rtn import RTNLinear, pack_bits, rtn_dequantize, rtn_quantize, unpack_bits
from prunekit.quant.saving import load_quantized, save_quantized
from prunekit.quant.schemes import SCHEMES, QuantSettings
from prunekit.quant.search import Budget, build_space, greedy_index, repair, search, uniform_index
from prunekit.training.lora import LoraSettings, train_lora

GGML = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
ALL = ["int8", "nf4", "fp4", "rtn2", "rtn3", "rtn4", "rtn8", *GGML, "fp16", "bf16"]
# llama.cpp's K-quants and their bits per weight (input widths of 256k, so not in the 64-wide models' plans)
K_QUANTS = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
SETTINGS = QuantSettings(group_size=16)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def mixed_plan(model) -> dict[str, str]:
    """Every scheme on some module of the tiny model (28 Linears, 14 schemes; llama.cpp's block formats need
    input widths that are multiples of 32: hidden 64)."""
    return {t.name: ALL[i % len(ALL)] for i, t in enumerate(quant_targets(model, adapter_for(model.config)))}


def block_model() -> nn.Module:
    """The tiny GQA Llama with hidden 64: every Linear's input width a multiple of llama.cpp's block of 32."""
    return tiny_model(hidden_size=64)


@torch.no_grad()
def realised_logits(model: nn.Module, plan: dict[str, str], ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits of ``model`` as it is, fake-quantized by ``plan``, then realised by it (in place)."""
    dense = model(ids).logits
    with fake_quantized(model, plan, SETTINGS):
        expected = model(ids).logits
    realise(model, plan, SETTINGS)
    return dense, expected, model(ids).logits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("rows", "cols", "group", "shift"), [(33, 40, 16, 0.0), (8, 128, 128, 0.0), (5, 7, 7, 0.3)])
def test_rtn_error_within_half_a_step(bits: int, rows: int, cols: int, group: int, shift: float) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(bits)) * 0.05 + shift  # shift: all > 0
    w[0, :group] = 0.0  # a group of zeros: exact
    codes, scale, zero = rtn_quantize(w, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    w_hat = rtn_dequantize(codes, scale, zero, group)
    step = scale.float().repeat_interleave(group, dim=1)[:, :cols]
    # Independent bound: half a step of the stored scale, and the step is the group range / (2^b - 1)
    # rounded up to float16 (so it is at most one float16 ulp above the exact step).
    assert torch.all((w - w_hat).abs() <= step / 2 * (1 + 1e-6))
    g = torch.nn.functional.pad(w, (0, -cols % group)).reshape(rows, -1, group) if cols % group == 0 else None
    if g is not None:
        exact = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / (2**bits - 1)
        nonzero = exact > 0
        assert torch.all(scale.float()[nonzero] >= exact[nonzero])
        assert torch.all(scale.float()[nonzero] <= exact[nonzero] * (1 + 2**-10))
    assert torch.equal(w_hat[0, :group], torch.zeros(group))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_roundtrip_and_size(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (37, 11), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).view_as(codes), codes)


def test_plan_quantizes_exactly_the_named_modules() -> None:
    model, ref = tiny_model(), tiny_model()
    plan = {"model.layers.1.self_attn.k_proj": "nf4", "model.layers.2.mlp.down_proj": "rtn3"}
    realise(model, plan, SETTINGS)
    ref_modules = dict(ref.named_modules())
    for name, module in model.named_modules():
        if name in plan:
            assert not isinstance(module, nn.Linear) or type(module).__name__ == "Linear4bit"
            assert type(module) is not nn.Linear
        elif isinstance(ref_modules.get(name), nn.Linear):
            assert type(module) is nn.Linear and torch.equal(module.weight, ref_modules[name].weight)
    assert type(model.get_submodule("model.layers.1.self_attn.k_proj")).__name__ == "Linear4bit"
    assert isinstance(model.get_submodule("model.layers.2.mlp.down_proj"), RTNLinear)
    # Embeddings, norms and the LM head are never touched.
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    params, adapters = logical_param_count(model)
    assert params == sum(p.numel() for p in ref.parameters()) and adapters == 0


def test_unknown_module_or_scheme_in_a_plan() -> None:
    model = tiny_model()
    with pytest.raises(PrunekitError, match="Unknown quantization scheme 'nf5'. Did you mean 'nf4'"):
        realise(model, {"model.layers.0.mlp.up_proj": "nf5"}, SETTINGS)
    from prunekit.quant.plan import check_plan

    with pytest.raises(PrunekitError, match="model.layers.9.mlp.up_proj"):
        check_plan({"model.layers.9.mlp.up_proj": "nf4"}, quant_targets(model, adapter_for(model.config)))


def test_fake_quantized_matches_realised_and_restores_weights() -> None:
    model = block_model()
    plan = mixed_plan(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids()
    with torch.no_grad():
        with fake_quantized(model, plan, SETTINGS):
            simulated = model(ids).logits
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        dense = model(ids).logits
        realise(model, plan, SETTINGS)
        real = model(ids).logits
    # Same weights; only the compute paths differ (bitsandbytes' int8 matmul rounds its inputs to int8 too).
    assert (real - simulated).abs().max() < 0.05 * (real - dense).abs().max()


def test_storage_cost_of_rtn_modules_is_what_they_hold() -> None:
    model = tiny_model()
    plan = {t.name: "rtn3" for t in quant_targets(model, adapter_for(model.config))}
    cost = plan_cost(plan, quant_targets(model, adapter_for(model.config)), SETTINGS)
    realise(model, plan, SETTINGS)
    held = sum(
        sum(b.numel() * b.element_size() for b in m.buffers()) for m in model.modules() if isinstance(m, RTNLinear)
    )
    per_module_rounding = len(plan)  # each module's packed codes round up to a whole byte
    assert cost.avg_bits == 3.0
    assert cost.quantized_bytes <= held <= cost.quantized_bytes + per_module_rounding


def _space(model, choices=("rtn3", "nf4", "int8"), granularity="layer"):
    return build_space(quant_targets(model, adapter_for(model.config)), granularity, list(choices), SETTINGS)


def test_budget_is_enforced_by_repair_uniform_and_greedy() -> None:
    space = _space(tiny_model())
    n = len(space.groups)
    assert len(space.groups[0]) == 7 and space.choices == ["rtn3", "nf4", "int8"]
    budget = Budget(bits=5.0)  # 4 equal layers: one at int8 and three at nf4 is exactly 5 bits
    importance = [float(g + 1) for g in range(n)]  # the last layer matters most
    fixed = repair(space, [2] * n, importance, budget)  # all int8: 8 bits, far over
    assert space.fits(fixed, budget) and space.cost(fixed)[0] <= 5.0
    assert fixed == [0, 0, 1, 2]  # least important first, one choice at a time, until it fits (4.5 bits)
    assert uniform_index(space, budget) == [1] * n  # nf4 everywhere: the widest single scheme that fits
    greedy = greedy_index(space, importance, budget)
    assert greedy == [1, 1, 1, 2] and space.cost(greedy)[0] == 5.0  # the spare bit went to the last layer
    by_bytes = Budget(bytes=space.cost([1] * n)[1])
    assert uniform_index(space, by_bytes) == [1] * n
    with pytest.raises(PrunekitError, match="below the narrowest"):
        repair(space, [2] * n, importance, Budget(bits=2.0))
    with pytest.raises(PrunekitError, match="exactly one"):
        Budget(bits=4.0, bytes=100)


def test_search_records_every_trial_within_budget() -> None:
    model = tiny_model()
    space = _space(model, granularity="layer_module")
    ids = _ids()

    @torch.no_grad()
    def loss_of(plan):
        with fake_quantized(model, plan, SETTINGS):
            return float(model(input_ids=ids, labels=ids).loss)

    budget = Budget(bits=5.0)
    result = search(space, loss_of, budget, trials=4, random_starts=2, spreads=[0.5], seed=0)
    assert [t.source for t in result.trials[:2]] == ["uniform", "importance:greedy"]
    assert sum(t.source == "gp" for t in result.trials) == 4
    assert all(t.avg_bits <= 5.0 + 1e-9 for t in result.trials)
    best = result.best()
    assert best.loss == min(t.loss for t in result.trials) <= result.uniform().loss
    # The recorded loss is the loss of the recorded plan.
    assert best.loss == pytest.approx(loss_of(space.plan(best.index)))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", ["q4_0", "rtn4", "fp16"])
def test_embedding_and_output_head_quantized(tied: bool, scheme: str, tmp_path: Path) -> None:
    """The token embedding (and an untied head) in a plan: the realised model computes what the fake-quantized
    one does; a tied head is the embedding's own module, saved once; it reloads with the same logits and its
    stored bytes are the plan's cost plus the float weights."""
    from safetensors import safe_open

    from prunekit.evaluation.efficiency import efficiency

    model = tiny_model(hidden_size=64, tie_word_embeddings=tied)
    targets = quant_targets(model, adapter_for(model.config), embeddings=True)
    assert targets[0].name == "model.embed_tokens" and (targets[0].rows, targets[0].cols) == (128, 64)
    assert (targets[-1].name == "lm_head") is not tied  # a tied head follows the embedding
    plan = {t.name: scheme for t in targets if t.kind in ("embedding", "output")}
    plan["model.layers.1.mlp.up_proj"] = "q8_0"
    planned = sum(t.numel for t in targets if t.name in plan)
    floats = quantized_weight_bytes(model) - 4 * planned  # the rest, float32 as it was (buffers included)
    ids = _ids()
    dense, expected, got = realised_logits(model, plan, ids)
    assert (expected - dense).abs().max() > 1e-3 or scheme == "fp16"
    # Same weights; fp16 modules also compute in float16.
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3 if scheme == "fp16" else 1e-5)
    assert (model.get_output_embeddings() is model.get_input_embeddings().linear) is tied
    dense_model = tiny_model(hidden_size=64, tie_word_embeddings=tied)
    assert efficiency(model, adapter_for(model.config), [8]) == efficiency(dense_model, adapter_for(model.config), [8])
    model.tie_weights()  # as lm-eval does: nothing to tie, the head stays the embedding's module
    with torch.no_grad():
        assert torch.equal(model(ids).logits, got)
    assert quantized_weight_bytes(model) == floats + plan_cost(plan, targets, SETTINGS).quantized_bytes
    assert logical_param_count(model)[0] == logical_param_count(tiny_model(hidden_size=64, tie_word_embeddings=tied))[0]
    save_quantized(model, tiny_tokenizer(), plan, SETTINGS, "float32", tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("lm_head.") for k in f.keys()) is not tied
    loaded, _, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
    assert (loaded.get_output_embeddings() is loaded.get_input_embeddings().linear) is tied


def test_embedding_refused_by_formats_that_cannot_look_up() -> None:
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices
    from prunekit.quant.plan import check_plan

    model = tiny_model(hidden_size=64)
    targets = quant_targets(model, adapter_for(model.config), embeddings=True)
    with pytest.raises(PrunekitError, match="scheme 'nf4' cannot hold the token embedding model.embed_tokens"):
        check_plan({"model.embed_tokens": "nf4"}, targets)
    check_plan({"lm_head": "nf4"}, targets)  # an untied head is a Linear: every format holds it
    with pytest.raises(PrunekitError, match="search.embeddings: false"):
        realise(model, {"model.embed_tokens": "int8"}, SETTINGS)
    with pytest.raises(ParamsError, match="'search.choices\\[1\\]': scheme 'nf4' cannot hold the token embedding"):
        check_choices(parse_params({"search": {"choices": ["q4_0", "nf4"], "embeddings": True}}))
    check_choices(parse_params({"search": {"choices": ["q4_0", "nf4"], "embeddings": False}}))


@pytest.mark.parametrize("tied", [False, True])
def test_search_gives_the_embedding_a_scheme_within_the_budget(tied: bool) -> None:
    """search.embeddings: the embedding (and an untied head) are groups of their own, their bytes count in the
    budget (the tied head once), and the plan names them."""
    from prunekit.pipeline.params import SearchParams
    from prunekit.quant.search import search_model

    model = tiny_model(hidden_size=64, tie_word_embeddings=tied)
    adapter = adapter_for(model.config)
    targets = quant_targets(model, adapter, embeddings=True)
    space = build_space(targets, "layer", ["q4_0", "q8_0"], SETTINGS)
    assert space.labels[0] == "embedding" and (space.labels[-1] == "output") is not tied
    budget = space.cost([0] * len(space.groups))[1] + (128 * 64 * 9 // 16)  # room for about half the embedding
    cfg = SearchParams(choices=["q4_0", "q8_0"], embeddings=True, budget_bits=None, budget_bytes=budget, trials=2,
                       random_starts=1, importance_spreads=[0.5], samples=2, seq_len=12, batch_size=2)  # fmt: skip
    held = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    out = search_model(model, adapter, held, cfg, SETTINGS, seed=0)
    assert "model.embed_tokens" in out.plan and ("lm_head" in out.plan) is not tied
    assert plan_cost(out.plan, targets, SETTINGS).quantized_bytes == out.metrics["best"]["bytes"] <= budget
    assert all(r["quantized_bytes"] <= budget and "embedding" in r["plan"] for r in out.trials)
    # Sensitivity per group, the embedding's measured like a layer's: the narrowest choice on it alone.
    with torch.no_grad():
        base = float(model(input_ids=held, labels=held).loss)
        with fake_quantized(model, {"model.embed_tokens": "q4_0"}, SETTINGS):
            alone = float(model(input_ids=held, labels=held).loss)
    assert out.sensitivity[0]["group"] == "embedding"
    assert out.sensitivity[0]["loss_increase"] == pytest.approx(max(alone - base, 1e-9), abs=2e-6)


def test_lora_gradients_flow_after_an_eval_forward() -> None:
    """bitsandbytes repacks Linear4bit weights in place on the first eval forward on AVX512-BF16 CPUs,
    after which gradients through them silently vanish; realise() turns that path off. The LoRA
    gradients after an eval forward must equal those of a model that never ran one, and be nonzero."""
    from peft import LoraConfig, get_peft_model

    # Input widths a multiple of bitsandbytes' 64-block, as the repacking kernel expects.
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    plan = {t.name: "nf4" for t in quant_targets(tiny_model(**shape), adapter_for(tiny_model(**shape).config))}
    ids = _ids(2)
    grads = []
    for eval_first in (False, True):
        model = realise(tiny_model(**shape), plan, SETTINGS)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(_ids())
        torch.manual_seed(0)
        config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "down_proj"])
        pm = get_peft_model(model, config)
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # B = 0 at init would make every lora_A gradient 0
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(7))
        pm.train()
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * tiny_model().config.num_hidden_layers
    for name, g in grads[1].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[0][name], msg=name)


def test_quantized_model_saves_and_reloads_with_the_same_outputs(tmp_path: Path) -> None:
    model = block_model()
    plan = mixed_plan(model)
    realise(model, plan, SETTINGS)
    cfg = LoraSettings(
        rank=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], learning_rate=1e-2,
        batch_size=2, steps=2, warmup_steps=0, weight_decay=0.0, seed=0,
    )  # fmt: skip
    blocks = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    peft_model, _ = train_lora(model, blocks, cfg, merge=False, custom_modules=lora_custom_modules())
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    save_quantized(model, tiny_tokenizer(), plan, SETTINGS, "float32", tmp_path / "q", peft_model=peft_model)
    loaded, _, loaded_plan = load_quantized(tmp_path / "q")
    assert loaded_plan == plan
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    # And without adapters.
    plain = realise(block_model(), plan, SETTINGS).eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    save_quantized(plain, tiny_tokenizer(), plan, SETTINGS, "float32", tmp_path / "plain")
    reloaded, _, _ = load_quantized(tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    # Stored bytes count the quantized base only: the adapters are reported apart.
    assert quantized_weight_bytes(loaded.get_base_model()) == quantized_weight_bytes(reloaded)
    assert logical_param_count(loaded)[1] == sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) > 0


@pytest.mark.parametrize("mode", ["once", "auto"])
def test_qlora_on_weights_decoded_once_trains_as_on_every_pass(mode: str) -> None:
    """The frozen weights decoded once for the training (rtn and llama.cpp blocks) give QLoRA the same losses and
    adapters as decoding them on every pass; the copies go when the training ends."""
    from prunekit.quant.frozen import HoldsDecoded, decoded_once

    cfg = LoraSettings(
        rank=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], learning_rate=1e-2,
        batch_size=2, steps=3, warmup_steps=0, weight_decay=0.0, seed=0,
    )  # fmt: skip
    blocks = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    results = {}
    for how in ("every_pass", mode):
        base = block_model()
        model = realise(base, mixed_plan(base), SETTINGS)
        held = [m for m in model.modules() if isinstance(m, HoldsDecoded)]
        assert {type(m).__name__ for m in held} >= {"RTNLinear", "GGMLLinear"}
        with decoded_once(model, how) as once:
            assert once == (how != "every_pass")  # auto: a tiny model's copies fit
            assert all((m.held is not None) == once for m in held)
            if once:
                assert all(torch.equal(m.held, m.dequantized_weight()) for m in held)
            peft_model, losses = train_lora(model, blocks, cfg, merge=False, custom_modules=lora_custom_modules())
        assert all(m.held is None for m in held)
        adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        results[how] = (losses, adapters)
    assert results[mode][0] == results["every_pass"][0]
    assert results[mode][1].keys() == results["every_pass"][1].keys()
    for name, p in results[mode][1].items():
        assert torch.equal(p, results["every_pass"][1][name]), name


def test_corrupt_or_missing_quantized_checkpoint(tmp_path: Path) -> None:
    plain = realise(tiny_model(), {"model.layers.0.mlp.up_proj": "rtn4"}, SETTINGS)
    save_quantized(plain, tiny_tokenizer(), {"model.layers.0.mlp.up_proj": "rtn4"}, SETTINGS, "float32", tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PrunekitError, match="cannot be read"):
        load_quantized(tmp_path / "q")
    weights.unlink()
    with pytest.raises(PrunekitError, match="no model.safetensors"):
        load_quantized(tmp_path / "q")


def test_schemes_registry_lists_every_format() -> None:
    assert SCHEMES.names() == sorted([*ALL, *K_QUANTS])
    assert {SCHEMES.get(n).bits for n in [*ALL, *K_QUANTS]} == {2, 3, 4, 5, 6, 8, 16}
    copy.deepcopy(SETTINGS)  # settings are plain data (saved in the plan JSON)


def test_list_shows_schemes(capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("quantization schemes (search.choices)") :]
    assert all(f"  {name} " in section for name in [*ALL, *K_QUANTS])


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"choices": ["rtn3", "nf5"]},
            "params.yaml key 'search.choices[1]': Unknown quantization scheme 'nf5'. Did you mean 'nf4'",
        ),
        ({"choices": ["nf4"]}, "params.yaml key 'search.choices': list at least two schemes"),
        ({"budget_bits": 4.0, "budget_bytes": 1000}, "'search.budget_bits' / 'search.budget_bytes': set exactly one"),
        ({"budget_bits": None}, "'search.budget_bits' / 'search.budget_bytes': set exactly one"),
    ],
)
def test_search_params_errors(search: dict, message: str) -> None:
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices

    with pytest.raises(ParamsError) as e:
        check_choices(parse_params({"search": search}))
    assert message in str(e.value)


TOY_FORMAT = '''
"""A toy format: one sign bit per weight and a float16 mean magnitude per row (binary weights)."""

import torch
from torch import nn

from prunekit.quant.backend import BACKENDS, QuantBackend
from prunekit.quant.schemes import SCHEMES, Scheme


class SignLinear(nn.Module):
    def __init__(self, rows, cols, bias):
        super().__init__()
        self.in_features, self.out_features = cols, rows
        self.register_buffer("signs", torch.zeros(rows, cols, dtype=torch.bool))
        self.register_buffer("scale", torch.zeros(rows, 1, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(rows), requires_grad=False) if bias else None

    def forward(self, x):
        w = (self.signs.float() * 2 - 1) * self.scale.float()
        return nn.functional.linear(x, w.to(x.dtype), self.bias)


class Sign(QuantBackend):
    name = "sign"

    def storage_bits(self, scheme, rows, cols, settings):
        return rows * cols + 16 * rows

    def fake_quantize(self, w, scheme, settings):
        scale = w.abs().mean(dim=1, keepdim=True).half().float()
        return (torch.where(w >= 0, 1.0, -1.0) * scale).to(w.dtype)

    def realise(self, linear, scheme, settings):
        module = SignLinear(linear.out_features, linear.in_features, linear.bias is not None)
        module.signs.copy_(linear.weight >= 0)
        module.scale.copy_(linear.weight.abs().mean(dim=1, keepdim=True))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias)
        return module

    def holds(self, module):
        return isinstance(module, SignLinear)

    def load(self, linear, scheme, settings, state, device):
        module = SignLinear(linear.out_features, linear.in_features, linear.bias is not None)
        module.load_state_dict(state)
        return module.to(device)


BACKENDS.register("sign")(Sign())
SCHEMES.register("sign1")(Scheme("sign1", 1, "sign", "one sign bit per weight, a float16 scale per row"))
'''


def test_a_new_format_is_one_module(tmp_path: Path, monkeypatch) -> None:
    """A backend and its scheme registered in a module of their own: planned, costed, searched (its image),
    realised, saved and reloaded like the built-in ones."""
    import importlib.util

    from prunekit.quant.backend import BACKENDS

    monkeypatch.setattr(SCHEMES, "_items", dict(SCHEMES._items))  # the registrations end with the test
    monkeypatch.setattr(BACKENDS, "_items", dict(BACKENDS._items))
    (tmp_path / "toy_format.py").write_text(TOY_FORMAT)
    spec = importlib.util.spec_from_file_location("toy_format", tmp_path / "toy_format.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    model = tiny_model()
    targets = quant_targets(model, adapter_for(model.config))
    plan = {t.name: ("sign1" if t.layer % 2 else "rtn4") for t in targets}
    cost = plan_cost(plan, targets, SETTINGS)
    signs = [t for t in targets if t.layer % 2]
    assert cost.quantized_weights == sum(t.numel for t in targets)
    assert cost.avg_bits == pytest.approx((sum(t.numel for t in signs) + 4 * (cost.quantized_weights - sum(
        t.numel for t in signs))) / cost.quantized_weights)  # fmt: skip
    ids = _ids()
    with torch.no_grad():
        with fake_quantized(model, plan, SETTINGS):
            simulated = model(ids).logits
        realise(model, plan, SETTINGS)
        real = model(ids).logits
    torch.testing.assert_close(real, simulated, rtol=1e-4, atol=1e-4)
    save_quantized(model, tiny_tokenizer(), plan, SETTINGS, "float32", tmp_path / "q")
    loaded, _, loaded_plan = load_quantized(tmp_path / "q")
    assert loaded_plan == plan
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, real)
    assert logical_param_count(loaded)[0] == logical_param_count(tiny_model())[0]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_ggml_dequantization_is_the_gguf_packages_bit_for_bit(kind: str) -> None:
    """The torch dequantization of the forward pass equals llama.cpp's gguf package on the same blocks (a zero
    block and rows of different scales included), and stays within half a step of the weight."""
    import gguf
    import numpy as np

    from prunekit.quant.ggml import dequantize
    from prunekit.quant.gguf_types import encode, qtype

    torch.manual_seed(0)
    w = torch.randn(7, 96) * torch.rand(7, 1) * 3
    w[0, :32] = 0
    blocks = encode(w, kind)
    reference = np.ascontiguousarray(gguf.quants.dequantize(blocks, qtype(kind)), dtype=np.float32)
    got = dequantize(torch.from_numpy(blocks), kind, 7, 96)
    assert torch.equal(got, torch.from_numpy(reference).reshape(7, 96))
    assert torch.equal(got[0, :32], torch.zeros(32))


def test_k_quants_realise_save_and_reload_with_llama_cpps_blocks(tmp_path, monkeypatch) -> None:
    """A model whose input widths are multiples of 256 (the K-quants' super-block), every K-quant on some modules,
    the token embedding included: each realised weight is the gguf package's decoding of the blocks llama.cpp's
    quantizer wrote (the fake-quantized image, bit for bit), takes the format's published bits per weight, and errs
    less as the format widens; the realised model computes the fake-quantized model's logits and reloads to the
    same ones, also where llama-cpp-python is missing (decoding needs only the gguf package)."""
    import importlib.util

    from prunekit.quant import gguf_types
    from prunekit.quant.ggml import GGMLLinear
    from prunekit.quant.gguf_types import fake_quantize

    model = tiny_model(hidden_size=256, intermediate_size=512, head_dim=32)
    targets = quant_targets(model, adapter_for(model.config), embeddings=True)
    names = list(K_QUANTS)
    plan = {t.name: names[i % len(names)] for i, t in enumerate(targets)}
    assert plan["model.embed_tokens"] == "q2_k"
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in plan}
    ids = _ids()
    dense, expected, got = realised_logits(model, plan, ids)
    errors: dict[str, list[float]] = {n: [] for n in names}
    for name, scheme in plan.items():
        module = model.get_submodule(name)
        linear = module if isinstance(module, GGMLLinear) else module.linear  # the embedding holds one
        w = weights[name]
        assert linear.kind == scheme.upper()
        image = linear.dequantized_weight()
        assert torch.equal(image, fake_quantize(w, scheme.upper()))
        assert linear.qweight.numel() * 8 == K_QUANTS[scheme] * w.numel()
        errors[scheme].append(float((image - w).pow(2).mean() / w.pow(2).mean()))
    worst = [max(errors[n]) for n in names]
    assert all(a > b for a, b in zip(worst, worst[1:], strict=False)), worst
    assert worst[-1] < 1e-3 and (expected - dense).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    save_quantized(model, tiny_tokenizer(), plan, SETTINGS, "float32", tmp_path / "q")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else find_spec(n, *a))
    gguf_types._quantize_chunk.cache_clear()
    try:
        with pytest.raises(PrunekitError, match="llama-cpp-python"):
            fake_quantize(weights["model.layers.0.mlp.up_proj"], "Q4_K")
        loaded, _, loaded_plan = load_quantized(tmp_path / "q")
    finally:
        monkeypatch.undo()
        gguf_types._quantize_chunk.cache_clear()
    assert loaded_plan == plan
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


def test_k_quants_need_widths_of_256() -> None:
    """The search refuses a K-quant choice for a model whose weights are 64 wide, naming the weight and the block."""
    model = block_model()
    targets = quant_targets(model, adapter_for(model.config))
    with pytest.raises(
        PrunekitError,
        match="'q4_k': model.layers.0.self_attn.q_proj has 64 input columns, not a multiple of Q4_K's block of 256",
    ):
        build_space(targets, "layer", ["q8_0", "q4_k"], SETTINGS)
