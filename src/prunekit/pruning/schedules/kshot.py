"""``prune.schedule: kshot``: TransAct's k shots of score -> cut -> train.

``schedule.shots`` rounds of: score with ``score.criterion`` on the current (already smaller) model, slice it to
``target * i / shots`` of the ORIGINAL parameters, then ``schedule.steps_per_shot`` LoRA steps (``schedule.lora``,
no warm-up) merged into the weights. The first round uses the score stage's scores (the same criterion on the same
dense model). Any registered criterion works; TransAct's own is ``activation``, with the same width in every layer
(``prune.allocation: uniform``) and head dims optional (``attn_qk_dim`` / ``attn_vo_dim``).

Each shot's plan numbers the units of the model that shot cuts; :class:`KeptUnits` follows every unit back to
the dense model, so the returned plan says which of the dense model's units remain (applied to the dense model
it gives the same shapes, and with no LoRA steps the same weights).

Resume: the sliced, merged model is checkpointed after every shot (:mod:`prunekit.pruning.schedules.state`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pruning.plan import Plan
from prunekit.pruning.schedules.base import SCHEDULES, Cut, PruneJob, PruneResult, Schedule
from prunekit.pruning.schedules.state import read_state, write_state
from prunekit.pruning.units import UNITS

log = logging.getLogger(__name__)


def kshot_targets(shots: int, target: float) -> list[float]:
    """The fraction of the original parameters removed after each shot: target * i / shots."""
    return [target * i / shots for i in range(1, shots + 1)]


class KeptUnits:
    """The dense model's indices of the units that remain after cuts whose plans each number the model they cut.

    Units inside a parent unit (query heads, head dims inside KV groups) survive a cut when they are kept and
    their parent is kept; a removed layer takes its units with it.
    """

    def __init__(self, model: CausalLM, adapter: ModelAdapter, units: list[str]) -> None:
        layers = adapter.layers(model)
        self.units = list(units)
        self.layer_ids = list(range(len(layers)))  # current layer -> dense layer
        self.dense_counts = {u: {i: self._count(adapter, layers, u, i) for i in self._layers(u, layers)} for u in units}
        self.ids = {u: {i: list(range(n)) for i, n in counts.items()} for u, counts in self.dense_counts.items()}
        self.touched: dict[str, set[int]] = {u: set() for u in units}  # dense layers some plan named
        self.removed_layers: set[int] = set()

    @staticmethod
    def _layers(unit: str, layers: nn.ModuleList) -> list[int]:
        return [0] if UNITS.get(unit).model_wide else list(range(len(layers)))

    @staticmethod
    def _count(adapter: ModelAdapter, layers: nn.ModuleList, unit: str, idx: int) -> int:
        return UNITS.get(unit).count(adapter, layers[idx])

    def cut(self, model: CausalLM, adapter: ModelAdapter, plan: Plan) -> None:
        """Record ``plan``, made for ``model`` as it is now (call before applying it)."""
        layers = adapter.layers(model)
        dropped = {cur for u in plan.keep if UNITS.get(u).whole_layer for cur, kept in plan.keep[u].items() if not kept}
        for u in self.units:
            ut, keep = UNITS.get(u), plan.keep.get(u, {})
            parent_keep = plan.keep.get(ut.parent, {}) if ut.parent else {}
            for cur, ids in self.ids[u].items():
                dense = cur if ut.model_wide else self.layer_ids[cur]
                if cur in keep:
                    self.touched[u].add(dense)
                if ut.whole_layer or cur not in keep and cur not in parent_keep:
                    continue
                survivors = sorted(keep[cur]) if cur in keep else list(range(len(ids)))
                if cur in parent_keep:
                    per_group = len(ids) // ut.groups(adapter, layers[cur])
                    groups = set(parent_keep[cur])
                    survivors = [k for k in survivors if k // per_group in groups]
                self.ids[u][cur] = [ids[k] for k in survivors]
        if dropped:
            self.removed_layers |= {self.layer_ids[cur] for cur in dropped}
            left = [cur for cur in range(len(self.layer_ids)) if cur not in dropped]
            self.layer_ids = [self.layer_ids[cur] for cur in left]
            for u in self.units:
                if not UNITS.get(u).model_wide:
                    self.ids[u] = {new: self.ids[u][cur] for new, cur in enumerate(left)}

    def keep(self) -> dict[str, dict[int, list[int]]]:
        """The dense model's kept units per unit type and dense layer, for the layers some plan named."""
        by_dense = {
            u: {(cur if UNITS.get(u).model_wide else self.layer_ids[cur]): ids for cur, ids in self.ids[u].items()}
            for u in self.units
        }
        out: dict[str, dict[int, list[int]]] = {}
        for u in self.units:
            ut = UNITS.get(u)
            out[u] = {}
            for dense in sorted(self.touched[u]):
                n = self.dense_counts[u][dense]
                if ut.whole_layer:
                    out[u][dense] = [] if dense in self.removed_layers else [0]
                elif dense in self.removed_layers:
                    out[u][dense] = list(range(n))  # a removed layer takes its units whole (as make_plan's plans)
                else:
                    out[u][dense] = self._fill_removed_groups(u, dense, by_dense[u][dense], by_dense)
        return out

    def _fill_removed_groups(self, unit: str, dense: int, ids: list[int], by_dense: dict) -> list[int]:
        """A plan keeps equal counts in every group of a child type, removed parents included: the children of
        a removed parent unit are listed as its first ones (the parent takes them with it)."""
        ut = UNITS.get(unit)
        if not ut.parent or ut.parent not in by_dense or dense not in by_dense[ut.parent]:
            return ids
        parents = by_dense[ut.parent][dense]
        groups = self.dense_counts[ut.parent][dense]
        per_group = self.dense_counts[unit][dense] // groups
        kept_per_group = len(ids) // max(1, len(parents))
        filled = set(ids)
        for g in set(range(groups)) - set(parents):
            filled |= set(range(g * per_group, g * per_group + kept_per_group))
        return sorted(filled)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer_ids": self.layer_ids,
            "ids": {u: {str(i): ids for i, ids in d.items()} for u, d in self.ids.items()},
            "touched": {u: sorted(s) for u, s in self.touched.items()},
            "removed_layers": sorted(self.removed_layers),
        }

    def load_json(self, data: dict[str, Any]) -> None:
        """Continue from a checkpoint's record (the tracker was built on the same dense model)."""
        self.layer_ids = list(data["layer_ids"])
        self.ids = {u: {int(i): list(ids) for i, ids in d.items()} for u, d in data["ids"].items()}
        self.touched = {u: set(s) for u, s in data["touched"].items()}
        self.removed_layers = set(data["removed_layers"])


@dataclass(frozen=True)
class KShotSettings:
    target: float
    shots: int
    lora: Any  # training.lora.LoraSettings of each shot's training (steps = schedule.steps_per_shot); seed + shot
    loss: Any = None  # training.lora.LossFn of the LoRA steps (None: the LM loss)


def kshot_prune(
    job: PruneJob, cfg: KShotSettings, stop_after: int | None = None
) -> tuple[CausalLM, Plan, list[dict[str, Any]]]:
    """TransAct's k shots (module docstring); returns (final model, plan on the dense model, a record per shot).

    Shot 1 cuts with ``job.scores``; later shots score the current model with ``job.cut.criterion`` on
    ``job.calibration`` (seed ``job.seed + shot``). ``stop_after`` ends the run after that many shots as if
    killed (tests); the state folder keeps the last checkpoint.
    """
    from prunekit.models.loading import load_model
    from prunekit.models.saving import save_model
    from prunekit.models.size import count_params
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.reconstruction import summary
    from prunekit.pruning.slicing import apply_plan
    from prunekit.training.lora import train_lora

    model, adapter, cut = job.model, job.adapter, job.cut
    original = count_params(model)
    kept = KeptUnits(model, adapter, list(cut.units))
    blocks = job.blocks(job.schedule.lora.seq_len)
    records: list[dict[str, Any]] = []
    start = 1
    state = read_state(job.state_dir, job.state_key) if job.state_dir is not None else None
    if state is not None and job.state_dir is not None:
        p = next(model.parameters())
        dtype, device = str(p.dtype).removeprefix("torch."), str(p.device)
        model, _, adapter = load_model(job.state_dir / "model", dtype, device)
        records, start, original = state["records"], state["shot"] + 1, state["original_params"]
        kept.load_json(state["kept"])
        log.info("kshot schedule: resuming after shot %d of %d", state["shot"], cfg.shots)
    for shot, fraction in enumerate(kshot_targets(cfg.shots, cfg.target), start=1):
        if shot < start:
            continue
        if shot == 1:
            scores = job.scores
        else:
            score_req = ScoreRequest(list(cut.units), cut.layers(model, adapter), job.calibration_tokens(),
                                     job.score_batch_size, job.seed + shot, job.score_options)  # fmt: skip
            scores = CRITERIA.get(cut.criterion).score(model, adapter, score_req)
        req = cut.request(model, adapter, fraction, original, job, label=f"shot {shot}")
        plan = cut.plan(scores, req)
        trials = cut.trials(req)
        fits = cut.refit(model, adapter, plan, job)  # before slicing: it writes the kept columns
        kept.cut(model, adapter, plan)
        apply_plan(model, adapter, plan, mode="slice")
        settings = dataclasses.replace(cfg.lora, seed=cfg.lora.seed + shot)
        model, losses = train_lora(model, blocks, settings, desc=f"shot {shot} LoRA", loss=cfg.loss)
        removed = 1 - count_params(model) / original
        records.append({"shot": shot, "target": fraction, "removed": removed, "loss": losses[-1] if losses else None}
                       | ({"reconstruction": summary(fits)} if fits else {})
                       | ({"trials": trials} if trials else {}))  # fmt: skip
        log.info("shot %d/%d: removed %.4f of the original parameters", shot, cfg.shots, removed)
        if job.state_dir is not None and shot < cfg.shots:
            record = {"shot": shot, "records": records, "original_params": original, "kept": kept.to_json()}

            def write(tmp: Path, model: CausalLM = model, adapter: ModelAdapter = adapter) -> None:
                save_model(model, adapter, job.tokenizer, tmp / "model")

            write_state(job.state_dir, job.state_key, record, write)
        if stop_after is not None and shot >= stop_after:
            raise KeyboardInterrupt(f"stopped after shot {shot} (stop_after)")
    final = Plan(keep=kept.keep(), params_before=original, params_after=count_params(model), target=cfg.target,
                 allocation=cut.allocation, criterion=cut.criterion)  # fmt: skip
    return model, final, records


class KShot(Schedule):
    """TransAct: shots of score -> cut -> LoRA steps, each cut a share of the target."""

    name = "kshot"

    def problems(self, cut: Cut) -> list[str]:
        if cut.bias_compensation:
            return [
                "params.yaml key 'prune.bias_compensation': not available with prune.schedule 'kshot' "
                "(the schedules retrain after each cut); use prune.schedule: oneshot"
            ]
        return []

    def run(self, job: PruneJob) -> PruneResult:
        from prunekit.training.lora import LoraSettings

        sc = job.schedule
        lora = LoraSettings.from_params(sc.lora, job.seed, "schedule.lora", steps=sc.steps_per_shot, warmup_steps=0)
        cfg = KShotSettings(target=job.cut.target, shots=sc.shots, lora=lora, loss=job.loss())
        model, plan, records = kshot_prune(job, cfg)
        trials = [t for record in records for t in record.pop("trials", [])]  # a plots file, not the metrics
        return PruneResult(model, plan, records, trials=trials)


SCHEDULES.register(KShot.name)(KShot())
