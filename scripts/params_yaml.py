"""Print, or write (--write), params.yaml as rendered from the typed defaults of prunekit.pipeline.params.

python scripts/params_yaml.py --write   # after changing a default or a description in src/prunekit/pipeline/params.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.params_file import render

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write params.yaml in place")
    args = parser.parse_args()
    text = render(Params())
    if args.write:
        (ROOT / "params.yaml").write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
