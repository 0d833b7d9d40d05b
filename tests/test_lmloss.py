"""The chunked LM loss and layer checkpointing give transformers' loss and gradients, with less kept."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.pipeline.params import ScoreParams
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.training.loss import layer_checkpointing, lm_loss


def _ids(n: int = 3, t: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [5, 48, 1000])  # uneven chunks, exactly one per window's tokens, one chunk
def test_lm_loss_equals_transformers_loss_and_gradients(chunk: int) -> None:
    ids = _ids()
    ref = tiny_model()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    model = tiny_model()
    loss = lm_loss(model, ids, chunk_tokens=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    expected, got = _grads(ref), _grads(model)
    assert got.keys() == expected.keys() and "model.embed_tokens.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lm_loss_through_a_peft_wrapper() -> None:
    ids = _ids()
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "down_proj"])
    torch.manual_seed(0)
    ref = get_peft_model(tiny_model(), config)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), config)
    for pm in (ref, model):  # B != 0, so both LoRA factors get gradients
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    ref(input_ids=ids, labels=ids).loss.backward()
    lm_loss(model, ids, chunk_tokens=7).backward()
    expected, got = _grads(ref), _grads(model)
    n_layers = model.get_base_model().config.num_hidden_layers
    assert got.keys() == expected.keys() and len(got) == 2 * 2 * n_layers  # A and B of 2 modules per layer
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lm_loss_refuses_windows_without_a_next_token() -> None:
    with pytest.raises(PrunekitError, match=r"tokens >= 2"):
        lm_loss(tiny_model(), torch.zeros(2, 1, dtype=torch.long))


def test_layer_checkpointing_recomputes_layers_keeps_dropout_off_and_restores_flags() -> None:
    ids = _ids()
    # Dropout in attention would make the eval-mode loss random if checkpointing switched it on.
    ref = tiny_model(attention_dropout=0.5)
    ref.eval()
    ref_loss = lm_loss(ref, ids)
    ref_loss.backward()
    model = tiny_model(attention_dropout=0.5)
    model.eval()
    calls = []
    # A pre-hook: checkpoint's recomputation stops as soon as the saved tensors are rebuilt, before forward hooks.
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    with layer_checkpointing(model):
        loss = lm_loss(model, ids)
        assert len(calls) == 1
        loss.backward()
        assert len(calls) == 2  # the MLP ran again in the backward pass: its activations were not kept
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    expected, got = _grads(ref), _grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not any(m.training for m in model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    calls.clear()
    lm_loss(model, ids).backward()
    assert len(calls) == 1  # after the context, no recomputation


def test_gradient_checkpointing_changes_no_gradient_score() -> None:
    calib = _ids(6, 16, seed=5)
    for name in ("param_first", "param_second", "lora"):
        scores = []
        for ckpt in (False, True):
            model = tiny_model()
            req = ScoreRequest(
                ["attn_kv_group", "mlp_channel"],
                [0, 2],
                calib,
                batch_size=4,
                seed=0,
                options=ScoreParams.model_validate({"gradient_checkpointing": ckpt, "lora": {"steps": 2}}),
            )
            scores.append(CRITERIA.get(name).score(model, adapter_for(model.config), req))
            assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert scores[0].keys() == scores[1].keys()
        for key in scores[0]:
            torch.testing.assert_close(scores[1][key], scores[0][key], rtol=1e-4, atol=1e-10, msg=f"{name} {key}")
