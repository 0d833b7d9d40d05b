"""Stage `validate`: check the whole params.yaml before any other stage touches its outputs.

Every other stage depends on this stage's output, so DVC runs it first whenever params.yaml changed at all
(a new or misspelled key included): a bad value stops `dvc repro` here, with the previous outputs intact.
Besides the values themselves (their types, ranges and registry names), it checks that params.yaml spells out
every key dvc.yaml tracks, and the params against the inputs they will meet where those are known without
downloading: the base model's shapes and tokenizer (``--model`` when made from ``model.source``, else what the
source shows), the texts (``--text`` when made from ``data``, else the local files)
(:mod:`prunekit.pipeline.preflight`). Its output never changes, so a valid change reruns only the stages whose
own params changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage

STAMP = "params.yaml is valid\n"  # constant: downstream stages see the same dependency after every valid change


def check(params: Params, args: argparse.Namespace) -> None:
    """Every check of the stage, every problem at once (:class:`ParamsError`)."""
    import yaml

    from prunekit.errors import ParamsError
    from prunekit.pipeline.preflight import input_problems
    from prunekit.pipeline.tracked import check_tracked
    from prunekit.pipeline.validation import check_choices

    check_tracked(yaml.safe_load(Path(args.params).read_text(encoding="utf-8")), args.dvcfile, Path(args.params).name)
    try:
        check_choices(params)
        problems = []
    except ParamsError as e:
        problems = str(e).splitlines()
    if not any(line.startswith("params.yaml key 'model.source'") for line in problems):
        problems += input_problems(params, args.model, args.text)
    if problems:  # the family's refusals may come from both checks: once each
        raise ParamsError("\n".join(dict.fromkeys(problems)))


def validate(params: Params, out: Path, model: Path, text: Path, dvcfile: Path) -> None:
    """Write the stamp ``out`` (:func:`check` passed before this runs)."""
    from prunekit.pipeline.outputs import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(STAMP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="stamp file every other stage depends on")
    parser.add_argument("--model", type=Path, required=True, help="the base model directory (download_model's)")
    parser.add_argument("--text", type=Path, required=True, help="the text directory (download_data's)")
    parser.add_argument("--dvcfile", type=Path, required=True, help="dvc.yaml: the params keys its stages track")
    return run_stage("validate", parser, validate, argv, check=check)


if __name__ == "__main__":
    exit_after(main)
