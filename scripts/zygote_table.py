"""zygote_table.py - issue 16's table from a zygote-bench.sh run: per server, the median over
rounds of each scenario's rate (with its range and timeouts), the ratios to the seed's C server,
ForkingTCPServer and the bare fork loop within the same round, and PSS per held connection at
persist c=100 ((max PSS in the window - idle PSS) / 100).

    python3 scripts/zygote_table.py OUT
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from typing import Any

SCENARIOS = ["connect_c10", "persist_c10", "persist_c100", "persist_c1000", "hol_c10_s5"]
ANCHORS = {"C": "seed_c", "FTS": "py_forking", "bare": "bare_fork"}


def load(out: str) -> tuple[dict[tuple[str, str, str], dict[str, Any]], list[str]]:
    recs = {}
    order: list[str] = []
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl")), key=os.path.getmtime):
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                recs[r["name"], r["scenario"], r["tag"]] = r
                if r["name"] not in order:
                    order.append(r["name"])
    return recs, order


def main() -> int:
    recs, order = load(sys.argv[1])
    tags = sorted({t for _, _, t in recs})
    for scen in SCENARIOS:
        if not any(s == scen for _, s, _ in recs):
            continue
        print(f"\n{scen} (medians of {len(tags)} rounds; ratios: median of the per-round ratios)\n")
        head = "| server | rate/s | range | timeouts | errors | / C | / FTS | / bare |"
        if scen == "persist_c100":
            head += " PSS/conn |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for name in order:
            rows = [recs[name, scen, t] for t in tags if (name, scen, t) in recs]
            if not rows:
                continue
            rps = [r["rps"] for r in rows]
            cells = [name, f"{statistics.median(rps):,.0f}", f"{min(rps):,.0f}-{max(rps):,.0f}",
                     "/".join(str(r["timeouts"]) for r in rows),
                     "/".join(str(r["errors"]) for r in rows)]
            for anchor in ANCHORS.values():
                ratios = [r["rps"] / recs[anchor, scen, r["tag"]]["rps"] for r in rows
                          if (anchor, scen, r["tag"]) in recs
                          and recs[anchor, scen, r["tag"]]["rps"]]
                cells.append(f"{statistics.median(ratios):.2f}" if ratios else "")
            if scen == "persist_c100":
                pss = [(r["mem"]["pss_kb"] - r["mem_idle"]["pss_kb"]) / r["conns"]
                       for r in rows if r.get("mem")]
                cells.append(f"{statistics.median(pss):,.0f} KB" if pss else "")
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
