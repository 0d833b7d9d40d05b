"""Print, or write into dvc.yaml (--write), the library code each stage depends on.

    python scripts/stage_deps.py            # each stage's script and the prunekit paths it runs
    python scripts/stage_deps.py --write    # put those paths in dvc.yaml's deps, after the stage's script

The paths come from the imports of the stage's script, followed through prunekit (prunekit.pipeline.code_deps).
The `validate` stage is listed too, though its output is a constant stamp: a change to the checks (a new refusal)
must rerun them on the params.yaml an earlier version passed, before a later stage removes its outputs and refuses
inside. It takes seconds, and its unchanged stamp reruns nothing after it. tests/test_code_deps.py fails when
dvc.yaml leaves a module out.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prunekit.pipeline.code_deps import dependency_paths, stage_modules

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"python (stages/\w+\.py)")


def stage_blocks(text: str) -> list[tuple[str, int, int]]:
    """(stage name, first line, end line) of each stage under ``stages:`` (two-space indented names)."""
    lines = text.splitlines()
    starts = [(m.group(1), i) for i, line in enumerate(lines) if (m := re.match(r"^  (\w+):\s*$", line))]
    ends = [i for _, i in starts[1:]] + [
        next((i for i, line in enumerate(lines) if line.startswith("plots:")), len(lines))
    ]
    return [(name, start, end) for (name, start), end in zip(starts, ends, strict=True)]


def expected(script: str) -> list[str]:
    return dependency_paths(stage_modules(ROOT / script, ROOT / "src"), ROOT / "src", ROOT)


def rewrite(text: str) -> str:
    """``text`` (dvc.yaml) with each stage's prunekit deps replaced by the derived ones."""
    lines = text.splitlines()
    out: list[str] = []
    cursor = 0
    for _name, start, end in stage_blocks(text):
        out += lines[cursor:start]
        block = lines[start:end]
        script = next((m.group(1) for line in block if (m := SCRIPT.search(line))), None)
        block = [line for line in block if "- src/prunekit" not in line]
        if script is not None:
            at = next(i for i, line in enumerate(block) if line.strip() == f"- {script}")
            indent = block[at][: len(block[at]) - len(block[at].lstrip())]
            block[at + 1 : at + 1] = [f"{indent}- {path}" for path in expected(script)]
        out += block
        cursor = end
    out += lines[cursor:]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update dvc.yaml in place")
    args = parser.parse_args()
    dvc_yaml = ROOT / "dvc.yaml"
    if args.write:
        dvc_yaml.write_text(rewrite(dvc_yaml.read_text()))
        return
    for script in sorted({m.group(1) for m in SCRIPT.finditer(dvc_yaml.read_text())}):
        print(script)
        for path in expected(script):
            print(f"  {path}")


if __name__ == "__main__":
    main()
