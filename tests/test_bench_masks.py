"""`nmkit bench masks` wiring: arguments parse, a cheap section runs, JSON is well-formed."""

from __future__ import annotations

import argparse
import json

import nmkit.bench.masks as bench


def test_bench_masks_tasd_section_json(capsys) -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--quick", "--only", "tasd", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["terms"], r["groups"]): r["rel_error"] for r in out["results"]}
    assert rows["2:4+1:4", "aligned"] == rows["3:4", "aligned"]  # nested supports: the same term
    assert rows["2:4+1:4", "staggered"] < rows["3:4", "aligned"]
    assert rows["1:4+2:8", "aligned"] < rows["2:4", "aligned"]
    assert "machine" in out["meta"]


def test_bench_masks_permutation_section_json(capsys) -> None:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--quick", "--only", "permutation", "--json", "--perm-budget", "1"])) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {r["pattern"] for r in rows} == {"2:4", "2:8", "8:16"}
    assert all(r["efficacy_pct"] > 0 and r["kept"] > r["kept_default"] for r in rows)
    # the i.i.d. 2:4 rows carry the first-moment ceiling estimate, above what the search reached
    two_four = [r for r in rows if r["pattern"] == "2:4"]
    assert all(r["efficacy_pct"] < r["ceiling_est_pct"] < 100 for r in two_four)
