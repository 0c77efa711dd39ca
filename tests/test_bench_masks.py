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
    rows = {r["terms"]: r for r in out["results"]}
    assert rows["2:4+1:4"]["rel_error"] == rows["3:4"]["rel_error"]
    assert rows["1:4+2:8"]["rel_error"] < rows["2:4"]["rel_error"]
    assert "machine" in out["meta"]
