"""``prune.schedule: oneshot``: one plan from the score stage's scores, one cut; recovery comes afterwards."""

from __future__ import annotations

from prunekit.pruning.schedules.base import SCHEDULES, PruneJob, PruneResult, Schedule


class OneShot(Schedule):
    """One plan from the score stage's scores, one cut; recovery comes afterwards."""

    name = "oneshot"
    trains = False
    layer_by_layer = True

    def run(self, job: PruneJob) -> PruneResult:
        from prunekit.models.size import count_params
        from prunekit.pruning.compensation import compensate
        from prunekit.pruning.slicing import apply_plan

        before = count_params(job.model)
        req = job.cut.request(job.model, job.adapter, job.cut.target, before, job)
        plan = job.cut.plan(job.scores, req)
        dense_names = {name for name, _ in job.model.named_parameters()}
        if job.cut.bias_compensation:
            compensate(job.model, job.adapter, plan, job.side)  # before slicing: it reads the removed columns
        fits = job.cut.refit(job.model, job.adapter, plan, job)  # before slicing too: it writes the kept columns
        apply_plan(job.model, job.adapter, plan, mode="slice")
        added = sum(t.numel() for name, t in job.model.named_parameters() if name not in dense_names)
        if count_params(job.model) - added != plan.params_after:
            raise RuntimeError(
                f"sliced model has {count_params(job.model) - added} parameters, the plan expected {plan.params_after}"
            )
        return PruneResult(job.model, plan, fits=fits, trials=job.cut.trials(req))


SCHEDULES.register(OneShot.name)(OneShot())
