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


def test_finetune_with_nm_attention_records_it_for_eval(pruned, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """DFSS recipe: fine-tune under N:M attention; the output remembers it and `nmkit eval` applies it."""
    common = ["--eval-seqlen", "64", "--eval-windows", "2", "--data-dir", tiny_data_dir]
    out = tmp_path / "ft-attn"
    code = _finetune([pruned, "--steps", "3", "--batch", "2", "--seqlen", "32", "--lr", "1e-3", "--out", out,
                      "--attention", "1:4", "--attention-layers", "1", *common])
    assert code == 0
    report = json.loads((out / "finetune.json").read_text())
    meta = json.loads((out / "nmkit.json").read_text())
    assert meta["runtime"] == {"attention": {"pattern": "1:4", "layers": [1]}} and meta["pattern"] == "2:4"
    assert report["ppl_before_source"] == "measured" and report["mask_unchanged"] and report["all_valid"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(tiny_data_dir), "--json"]) == 0  # protocol from nmkit.json
    applied = json.loads(capsys.readouterr().out)
    assert applied["eval"]["seqlen"] == 64 and applied["eval"]["windows"] == 2
    assert applied["attention"] == "1:4" and applied["attention_layers"] == [1]
    assert applied["ppl"] == pytest.approx(report["ppl_after"], rel=1e-5)
    assert main(["eval", str(out), *map(str, common), "--attention", "none", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["attention"] is None and plain["ppl"] != applied["ppl"]
    # Saved while N:M attention was off: the config loads anywhere, with no nmkit name in it.
    assert "nmkit" not in (out / "config.json").read_text()


def test_finetune_a_dense_model_for_nm_attention(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "dense-attn"
    code = _finetune([tiny_model_dir, "--steps", "2", "--batch", "1", "--seqlen", "32", "--out", out,
                      "--attention", "2:4", "--eval-seqlen", "64", "--eval-windows", "1", "--data-dir",
                      tiny_data_dir])
    assert code == 0
    report = json.loads((out / "finetune.json").read_text())
    assert report["pattern"] == "dense" and report["ppl_dense"] > 0 and report["ppl_before"] != report["ppl_dense"]
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    control = tmp_path / "dense-control"
    assert _finetune([tiny_model_dir, "--steps", "2", "--batch", "1", "--seqlen", "32", "--out", control,
                      "--attention", "dense", "--no-eval", "--data-dir", tiny_data_dir]) == 0
    assert "runtime" not in json.loads((control / "nmkit.json").read_text())
    assert json.loads((control / "finetune.json").read_text())["attention"] is None


@pytest.mark.parametrize("extra, message", [
    ([], "no nmkit.json"),
    (["--attention", "2:4", "--lora", "2"], "drop --lora"),
    (["--attention", "2:4"], "--out"),
    (["--attention-layers", "1"], "needs --attention"),
])
def test_finetune_dense_model_errors(tiny_model_dir, extra, message):
    from nmkit.errors import UserError

    with pytest.raises(UserError, match=message):
        _finetune([tiny_model_dir, "--steps", "1", *extra])
