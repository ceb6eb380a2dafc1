"""Per-step wall time of a finished `layermoe demo` (or any recipe run), read from its manifest.

    time layermoe -w layermoe-demo demo && python bench/demo_steps.py layermoe-demo

Every step record holds started_at / finished_at; what lies between two steps (model loads
outside a step, `extend`'s drift check after the expansion, the report) is shown as "between".
The base model's eval (G0's record) runs inside G1's and G2's eval; its time is the last run's.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

STEPS = ("profile", "allocation", "expansion", "stage1", "stage2", "eval")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.workdir / "manifest.json").read_text(encoding="utf-8"))
    rows, previous_end, first_start = [], None, None
    for generation in manifest["generations"][1:]:
        cells = []
        for name in STEPS:
            step = generation.get(name) or {}
            start, end = _time(step.get("started_at")), _time(step.get("finished_at"))
            if start is None or end is None:
                cells.append("—")
                continue
            first_start = first_start or start
            gap = (start - previous_end).total_seconds() if previous_end else 0.0
            cells.append(f"{(end - start).total_seconds() / 60:.2f}" + (f" (+{gap / 60:.2f})" if gap > 3 else ""))
            previous_end = end
        rows.append([f"G{generation['index']}", *cells])
    print("| | " + " | ".join(STEPS) + " |")
    print("|---" * (len(STEPS) + 1) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    base = manifest["generations"][0].get("eval") or {}
    if base.get("started_at") and base.get("finished_at"):
        seconds = (_time(base["finished_at"]) - _time(base["started_at"])).total_seconds()
        print(f"\nbase model's eval (last run, inside the eval above): {seconds / 60:.2f} min")
    if first_start and previous_end:
        print(f"first step start to last step end: {(previous_end - first_start).total_seconds() / 60:.2f} min "
              "(minutes; '(+x)' = time since the previous step ended)")


if __name__ == "__main__":
    main()
