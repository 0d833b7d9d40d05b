"""Prune a model one decoder layer at a time (``model.offload: layerwise``): never the whole model in memory.

The plan comes from the scores and the layers' shapes alone (the model built on the ``meta`` device). Then, for
decoder layer 0, 1, ...: the layer is read from the safetensors files, compensated (FLAP's biases) or refit
(least squares on the calibration activations, which are carried from layer to layer as the pruned layers
produce them: :mod:`prunekit.pruning.reconstruction`), sliced, and written as its own safetensors shard under its
new index before the next layer is read. Embedding, final norm and output head are copied, a shard each; the config,
generation config, tokenizer and the shard index complete a directory that ``from_pretrained`` (or another
layerwise stage) reads like the one the in-memory path writes: same tensors, same config, sharded differently.

Only the one-shot cut (``prune.schedule: oneshot``) with a rule allocation runs this way: schedules that train
or rescore between cuts and the allocation search evaluate the whole model (params refuse them).

Peak memory: one decoder layer (two with reconstruction, which also keeps a masked copy and three n x n float64
Gram matrices of one projection), the calibration hidden states (in memory up to ``activations_mib``, on disk
beyond), the embedding rows of the calibration tokens; the embedding and output head once, at the end, to copy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.models.layerwise import LAYERS_PREFIX, LayerwiseModel
from prunekit.models.shards import ShardWriter
from prunekit.pruning.plan import Plan
from prunekit.pruning.schedules.base import PruneJob, PruneResult

log = logging.getLogger(__name__)


# Why the refit model cannot be judged as a whole here (the params check and prune_layerwise say so).
UNJUDGED = (
    "model.offload: layerwise never holds the whole model, so it cannot judge the refit model against the sliced "
    "one; set prune.reconstruct_standard_errors: null (each projection is still judged on held-out windows)"
)


@torch.no_grad()
def prune_layerwise(
    lw: LayerwiseModel, job: PruneJob, out_dir: Path, activations_mib: int | None = None
) -> PruneResult:
    """Cut the model of ``lw`` to ``job.cut.target`` in one shot and write the pruned model to ``out_dir`` (an
    empty folder), one decoder layer in memory at a time; the result's model is ``lw``'s (on ``meta``, with the
    pruned shapes). Everything that can be checked from shapes is checked before the first layer is read."""
    from prunekit.models.provenance import make_reproducible
    from prunekit.models.saving import config_for
    from prunekit.models.shards import ShardWriter, save_checked_config
    from prunekit.models.size import count_params
    from prunekit.pruning.compensation import checked_columns, mark_biases
    from prunekit.pruning.reconstruction import check_plan
    from prunekit.pruning.slicing import check_plan_fits
    from prunekit.pruning.units import UNITS
    from prunekit.pruning.units.layers import remove_layers

    model, adapter, cut = lw.model, lw.adapter, job.cut
    if job.model is not model:
        raise ValueError("the job's model must be the layerwise model's (lw.model)")
    before = count_params(model)
    plan = cut.plan(job.scores, cut.request(model, adapter, cut.target, before, job))
    check_plan_fits(model, adapter, plan)
    columns = checked_columns(model, adapter, plan, job.side) if cut.bias_compensation else None
    if cut.reconstruct != "none":
        check_plan(plan)
        if cut.reconstruct_standard_errors is not None:
            raise PrunekitError(f"prune.reconstruct_standard_errors: {UNJUDGED}")
    n_layers = len(lw.layers)
    dropped = sorted({i for u, per in plan.keep.items() if UNITS.get(u).whole_layer for i, k in per.items() if not k})
    kept = [i for i in range(n_layers) if i not in dropped]
    if not kept:
        raise PrunekitError(f"the plan removes all {n_layers} decoder layers; keep at least one")
    outside = _outside_layers(lw)
    # one shard per kept layer, then one per tensor outside them (embedding, ...)
    shards = ShardWriter(out_dir, len(kept) + len(outside))
    mib = job.activations_mib if activations_mib is None else activations_mib
    fits, added = _cut_layers(lw, job, plan, columns, kept, shards, mib)
    # The skeleton now has the pruned shapes: drop the removed layers, describe it, copy what is outside the layers.
    remove_layers(model, adapter, dropped)
    if columns is not None:
        mark_biases(model.config, adapter)
    for name, is_param in outside.items():  # one at a time: the embedding may be the largest tensor
        tensor = lw.read(name)
        shards.write({name: (tensor.to(lw.dtype) if is_param else tensor).contiguous()})
        del tensor
    after = count_params(model)
    if after - added != plan.params_after:
        raise RuntimeError(f"the pruned model has {after - added} parameters, the plan expected {plan.params_after}")
    save_checked_config(config_for(model, adapter), lw.dtype, shards.shapes(), out_dir, lw.path)
    shards.finish()
    job.tokenizer.save_pretrained(out_dir)
    make_reproducible(out_dir)
    plan.params_after = after
    return PruneResult(model, plan, fits=fits, trials=[])


def _cut_layers(
    lw: LayerwiseModel,
    job: PruneJob,
    plan: Plan,
    columns: Any,
    kept: list[int],
    shards: ShardWriter,
    activations_mib: int,
) -> tuple[list[Any], int]:
    """Read, compensate or refit, slice and write every decoder layer in turn; (the refits' records, how many
    parameters the compensation added)."""
    from prunekit.pruning.compensation import compensate_layer
    from prunekit.pruning.reconstruction import layer_output, planned_layers, reconstruct_layer
    from prunekit.pruning.slicing import apply_plan_to_layer

    adapter, cut = lw.adapter, job.cut
    planned = planned_layers(plan)
    refit = cut.reconstruct != "none"
    hidden, arguments = lw.inputs(job.reconstruction_tokens(), job.score_batch_size, activations_mib) if refit else (
        None, [])  # fmt: skip
    fits: list[Any] = []
    added = 0
    try:
        for idx in tqdm(range(len(lw.layers)), desc="prune (layerwise)", unit="layer"):
            with lw.loaded(idx) as layer:
                dense_names = {name for name, _ in layer.named_parameters()}
                if columns is not None:
                    compensate_layer(adapter, layer, idx, columns, job.side)
                if hidden is not None:
                    kwargs = [per_batch[idx] for per_batch in arguments]
                    masked = apply_plan_to_layer(adapter, copy.deepcopy(layer), plan, idx, "mask")
                    if idx in planned:
                        fits += reconstruct_layer(adapter, layer, masked, idx, plan, hidden, kwargs, cut.refit_choice())
                    for b, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                        hidden.put(b, layer_output(masked(h, **kw)))
                    del masked
                if idx not in kept:
                    continue
                apply_plan_to_layer(adapter, layer, plan, idx, "slice")
                # Biases the compensation added, as sliced: the plan does not count them.
                added += sum(t.numel() for name, t in layer.named_parameters() if name not in dense_names)
                new = kept.index(idx)
                shards.write(
                    {
                        f"{LAYERS_PREFIX}{new}.{k}": v.detach().to("cpu").contiguous()
                        for k, v in layer.state_dict().items()
                    }
                )
    finally:
        if hidden is not None:
            hidden.close()
    return fits, added


def _outside_layers(lw: LayerwiseModel) -> dict[str, bool]:
    """The parameters (a tied head once) and stored buffers that are not in a decoder layer: name -> whether it is
    a parameter (written in the model's dtype; buffers keep theirs)."""
    params = [n for n, _ in lw.model.named_parameters() if not n.startswith(LAYERS_PREFIX)]
    buffers = [
        n for n in lw.model.state_dict() if n not in params and n in lw.files and not n.startswith(LAYERS_PREFIX)
    ]
    return dict.fromkeys(params, True) | dict.fromkeys(buffers, False)
