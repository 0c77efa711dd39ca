"""`nmkit finetune`: recovery fine-tune of a pruned tiny Llama keeps the mask and writes a new directory."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from nmkit.cli import main
from nmkit.commands import finetune
from nmkit.patterns import NM


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "pruned"
    code = main(
        [
            "prune",
            str(tiny_model_dir),
            "--pattern",
            "2:4",
            "--out",
            str(out),
            "--eval-seqlen",
            "64",
            "--eval-windows",
            "2",
            "--data-dir",
            str(tiny_data_dir),
            "--json",
        ]
    )
    assert code == 0
    return out


def _finetune(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return finetune.run(p.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize("extra", [["--distill"], ["--lora", "2", "--no-eval"]], ids=["distill", "lora"])
def test_finetune_keeps_mask_and_writes_new_dir(pruned, tiny_model_dir, tiny_data_dir, tmp_path, extra, capsys):
    out = tmp_path / "ft"
    code = _finetune(
        [
            pruned,
            "--steps",
            "4",
            "--batch",
            "2",
            "--seqlen",
            "32",
            "--out",
            out,
            "--lr",
            "1e-3",
            "--teacher",
            tiny_model_dir,
            "--data-dir",
            tiny_data_dir,
            *extra,
        ]
    )
    assert code == 0
    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    sidecar = json.loads((out / "nmkit.json").read_text())
    changed = 0
    for name in sidecar["layers"]:
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        assert NM(2, 4).is_valid(w1)
        assert torch.equal(w1 == 0, w0 == 0) or bool(((w1 != 0) <= (w0 != 0)).all())
        changed += int((w1 != w0).sum())
    assert changed > 0  # it did train
    report = json.loads((out / "finetune.json").read_text())
    assert report["mask_unchanged"] and report["all_valid"] and report["steps_done"] == 4
    if "--no-eval" not in extra:
        assert report["ppl_after"] > 0 and report["ppl_before"] > 0
    assert not list(tmp_path.glob(".ft.tmp-*"))  # no temporary directory left behind


def test_finetune_refuses_existing_output(pruned, tmp_path):
    from nmkit.errors import UserError

    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError):
        _finetune([pruned, "--steps", "1", "--out", tmp_path / "taken"])
