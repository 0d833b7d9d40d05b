"""Stage `validate`: check the whole params.yaml before any other stage touches its outputs.

Every other stage depends on this stage's output, so DVC runs it first whenever params.yaml changed at all
(a new or misspelled key included): a bad value stops `dvc repro` here, with the previous outputs intact.
Its output never changes, so a valid change reruns only the stages whose own params changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage
from prunekit.pipeline.validation import check_choices

STAMP = "params.yaml is valid\n"  # constant: downstream stages see the same dependency after every valid change


def validate(params: Params, out: Path) -> None:
    """Write the stamp ``out`` (``params`` were checked, registry names and the model's family included, by
    :func:`prunekit.pipeline.validation.check_choices` before this runs)."""
    from prunekit.pipeline.outputs import atomic_file

    with atomic_file(out) as tmp:
        tmp.write_text(STAMP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="stamp file every other stage depends on")
    return run_stage("validate", parser, validate, argv, check=check_choices)


if __name__ == "__main__":
    exit_after(main)
