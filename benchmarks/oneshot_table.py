"""Markdown table of `nmkit prune` reports (report.json files), for BENCHMARKS.md.

    python benchmarks/oneshot_table.py out/r-*/report.json
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> int:
    reports = [json.loads(open(p).read()) for p in paths]
    order = {"2:4": 0, "4:8": 1, "1:4": 2, "2:8": 3}
    reports.sort(key=lambda r: (order.get(r["pattern"], 9), r.get("ppl_sparse") or 0))
    print("| pattern | method | perplexity | increase over dense | prune wall s | prune CPU s |")
    print("|---|---|---|---|---|---|")
    for r in reports:
        if r.get("ppl_sparse") is None:
            continue
        inc = r["ppl_sparse"] - r["ppl_dense"]
        wall = r["timings"]["prune_s"]
        cpu = r["timings"].get("prune_cpu_s")  # reports before 2026-11-28 05:30 UTC lack it
        method = r["method"] + (" --permute" if r.get("permutations") else "")
        print(f"| {r['pattern']} | {method} | {r['ppl_sparse']:.2f} | +{inc:.2f} | {wall:.0f} | "
              f"{'-' if cpu is None else f'{cpu:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
