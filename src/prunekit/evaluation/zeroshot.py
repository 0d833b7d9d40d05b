"""Zero-shot multiple-choice accuracy with lm-eval on the in-memory model (``evaluate.zero_shot``).

Three kinds of task, all scored by lm-eval (``HFLM`` around the loaded model, ``simple_evaluate``):

* **Hub tasks** (``boolq``, ``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge``,
  ``openbookqa``; ``zero_shot.local_dir`` null): lm-eval's own task definitions and datasets, as the papers
  ran them. They need the Hugging Face Hub.
* **Local copies** (``zero_shot.local_dir`` set): the same tasks on ``<local_dir>/<task>.jsonl``. For each, a
  task YAML is written that *includes lm-eval's own YAML* (same prompt, choices, target, metrics and, for
  hellaswag / winogrande, the same preprocessing functions) and only points ``dataset_path: json`` at the
  file, as the split lm-eval evaluates. Each line of the file is one row in the Hub dataset's own format
  (:data:`LOCAL_FORMATS`), so an export of the Hub split (``Dataset.to_json``) works as-is.
* **auto_mc** (the offline default): built from the evaluation text. Each question is a passage of
  ``auto_mc_context_words`` words; the choices are its true next ``auto_mc_continuation_words`` words and
  ``auto_mc_choices - 1`` spans of the same length drawn from other documents, in a seeded random order.
  It measures whether the model still prefers the real continuation of a text, on any text, with no
  download. Chance is 1 / choices.

Reported per task: ``acc`` (the choice with the highest summed log-likelihood) and, where lm-eval defines it,
``acc_norm`` (log-likelihood divided by the choice's length in bytes), each with its standard error; then
the mean of each over the tasks that have it (``average``). BoolQ and WinoGrande have ``acc`` only. Papers
mix the two in their averages; the report keeps them apart.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM
from prunekit.registry import suggest

log = logging.getLogger(__name__)

AUTO_MC = "auto_mc"

# task -> (lm-eval YAML under lm_eval/tasks, the split lm-eval evaluates, which metrics it reports)
HUB_TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "boolq": ("super_glue/boolq/default.yaml", "validation", ("acc",)),
    "piqa": ("piqa/piqa.yaml", "validation", ("acc", "acc_norm")),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", ("acc", "acc_norm")),
    "winogrande": ("winogrande/default.yaml", "validation", ("acc",)),
    "arc_easy": ("arc/arc_easy.yaml", "test", ("acc", "acc_norm")),
    "arc_challenge": ("arc/arc_easy.yaml", "test", ("acc", "acc_norm")),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", ("acc", "acc_norm")),
}
TASK_NAMES = (AUTO_MC, *HUB_TASKS)

LOCAL_FORMATS: dict[str, str] = {
    "boolq": '{"question": str, "passage": str, "label": 0 (false) | 1 (true)}',
    "piqa": '{"goal": str, "sol1": str, "sol2": str, "label": 0 | 1}',
    "hellaswag": '{"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": [4 str], "label": "0".."3"}',
    "winogrande": '{"sentence": str with one "_", "option1": str, "option2": str, "answer": "1" | "2"}',
    "arc_easy": '{"question": str, "choices": {"text": [str], "label": ["A", ...]}, "answerKey": "A"}',
    "arc_challenge": '{"question": str, "choices": {"text": [str], "label": ["A", ...]}, "answerKey": "A"}',
    "openbookqa": '{"question_stem": str, "choices": {"text": [str], "label": ["A", ...]}, "answerKey": "A"}',
}


def check_task(name: str) -> None:
    if name not in TASK_NAMES:
        raise PrunekitError(
            f"unknown zero-shot task '{name}'.{suggest(name, list(TASK_NAMES))} Choose from " + ", ".join(TASK_NAMES)
        )


def check_local_dir(local_dir: str, tasks: Sequence[str]) -> None:
    """Raise unless ``local_dir`` holds ``<task>.jsonl`` for every hub task in ``tasks``."""
    root = Path(local_dir)
    if not root.is_dir():
        raise PrunekitError(f"'{local_dir}' is not a folder (relative paths start at '{Path.cwd()}')")
    missing = [f"{t}.jsonl" for t in tasks if t in HUB_TASKS and not (root / f"{t}.jsonl").is_file()]
    if missing:
        raise PrunekitError(
            f"'{local_dir}' lacks {', '.join(missing)}; each line one row in the Hub format, e.g. "
            + "; ".join(f"{Path(m).stem}: {LOCAL_FORMATS[Path(m).stem]}" for m in missing)
        )


# ---------------------------------------------------------------------------------------------------
# auto_mc


def auto_mc_rows(
    documents: Sequence[str], questions: int, choices: int, context_words: int, continuation_words: int, seed: int
) -> list[dict[str, Any]]:
    """Rows ``{"context", "choices", "label"}`` of the automatic task (see the module docstring)."""
    words = [doc.split() for doc in documents]
    need = context_words + continuation_words
    usable = [i for i, w in enumerate(words) if len(w) >= need]
    sources = [i for i, w in enumerate(words) if len(w) >= continuation_words]
    if not usable or len(sources) < 2:
        raise PrunekitError(
            f"auto_mc needs documents of at least {need} words (context + continuation) and two documents of "
            f"{continuation_words}; the evaluation text has {len(usable)} and {len(sources)}. Lower "
            "evaluate.zero_shot.auto_mc_context_words / auto_mc_continuation_words or use more evaluation text"
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(questions):
        doc = rng.choice(usable)
        start = rng.randrange(len(words[doc]) - need + 1)
        context = " ".join(words[doc][start : start + context_words])
        truth = " ".join(words[doc][start + context_words : start + need])
        options = [truth]
        while len(options) < choices:
            other = rng.choice(sources)
            if other == doc:
                continue
            at = rng.randrange(len(words[other]) - continuation_words + 1)
            span = " ".join(words[other][at : at + continuation_words])
            if span not in options:
                options.append(span)
        rng.shuffle(options)
        rows.append({"context": context, "choices": options, "label": options.index(truth)})
    return rows


AUTO_MC_YAML = {
    "task": AUTO_MC,
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "test_split": "test",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "choices",
    "doc_to_target": "label",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}


# ---------------------------------------------------------------------------------------------------
# task YAMLs


def lm_eval_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def local_task_config(task: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's own YAML for ``task``, included, with its evaluated split read from ``data_file``."""
    rel, split, _ = HUB_TASKS[task]
    config: dict[str, Any] = {
        "include": str(lm_eval_task_dir() / rel),
        "task": task,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }
    if task == "arc_challenge":
        config["dataset_name"] = None  # arc_easy.yaml is the base of both ARC tasks (as in lm-eval)
    return config


def write_task_yamls(
    out_dir: Path, tasks: Sequence[str], local_dir: str | None, auto_rows: list[dict[str, Any]] | None
) -> None:
    """The YAML (and, for auto_mc, the data file) of every task lm-eval should read from ``out_dir``."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task == AUTO_MC:
            data = out_dir / "auto_mc.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in auto_rows or []))
            config = {**AUTO_MC_YAML, "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}}
        elif local_dir:
            config = local_task_config(task, Path(local_dir) / f"{task}.jsonl")
        else:
            continue  # lm-eval's own hub task
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def zero_shot(
    model: CausalLM,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    local_dir: str | None = None,
    auto_rows: list[dict[str, Any]] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{task: {acc, acc_stderr[, acc_norm, acc_norm_stderr]}, "average": {acc[, acc_norm]}}`` via lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for task in tasks:
        check_task(task)
    if local_dir:
        check_local_dir(local_dir, tasks)
    hub = [t for t in tasks if t in HUB_TASKS and not local_dir]
    with tempfile.TemporaryDirectory(prefix="prunekit-tasks-") as tmp:
        write_task_yamls(Path(tmp), tasks, local_dir, auto_rows)
        # Built-in tasks are indexed only when a hub task needs them (indexing all costs seconds).
        manager = TaskManager(include_path=tmp, include_defaults=bool(hub))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            result = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (ConnectionError, OSError) as exc:
            raise PrunekitError(
                f"lm-eval could not load the tasks {hub} ({type(exc).__name__}: {exc}); offline, set "
                "evaluate.zero_shot.local_dir to a folder of local copies (README) or use auto_mc"
            ) from exc
    return summarize(result["results"], tasks)


def summarize(results: dict[str, dict[str, Any]], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-task acc / acc_norm (and stderr) from lm-eval's results, and their means over tasks."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results[task]
        metrics = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                metrics[metric] = round(float(row[f"{metric},none"]), 4)
                stderr = row.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    metrics[f"{metric}_stderr"] = round(float(stderr), 4)
        out[task] = metrics
    average = {}
    for metric in ("acc", "acc_norm"):
        values = [m[metric] for m in out.values() if metric in m]
        if values:
            average[metric] = round(sum(values) / len(values), 4)
    out["average"] = average
    return out
