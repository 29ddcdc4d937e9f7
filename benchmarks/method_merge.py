"""One method table from two runs of ``method.py``: lwq's rows and the baselines.

The baseline rows (uniform GPTQ, HQQ, llm-compressor, float16 dense-and-sparse)
do not depend on the sensitivity profile, so after a change to the method it is
enough to rerun ``method.py --skip-baselines`` and merge its rows with the
baselines of an earlier full run (each row keeps the numbers it was measured
with; the nearest configuration below and above each budget is chosen as
``method.py`` does).

    python benchmarks/method_merge.py NEW.json OLD.json [OLD2.json ...] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from method import nearest, print_table

BASELINES = ("GPTQ ", "HQQ ", "llm-compressor ", "FP16 0.45%")


def is_baseline(row: dict[str, Any]) -> bool:
    return str(row["row"]).startswith(BASELINES)


def merge(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    baselines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in old:
        if is_baseline(r):
            baselines.setdefault((r["model"], r["row"]), r)
    table = []
    for key in dict.fromkeys((r["model"], r["budget"]) for r in new if not is_baseline(r)):
        model, budget = key
        table += [r for r in new if (r["model"], r["budget"]) == key and not is_baseline(r)]
        mine = [r for (m, _), r in baselines.items() if m == model]
        table += [{**r, "budget": budget} for r in nearest(mine, budget)]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("new", type=Path, help="method.py --skip-baselines JSON (lwq's rows)")
    ap.add_argument("old", type=Path, nargs="+", help="earlier method.py JSONs (baselines)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    new = json.loads(args.new.read_text())["table"]
    old = [r for p in args.old for r in json.loads(p.read_text())["table"]]
    table = merge(new, old)
    sources = [str(p) for p in (args.new, *args.old)]
    args.json.write_text(json.dumps({"sources": sources, "table": table}, indent=1) + "\n")
    print_table(table)


if __name__ == "__main__":
    main()
