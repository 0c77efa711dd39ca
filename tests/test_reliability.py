"""Issue 13: every bad file, full disk, interrupted save and diverging run gets a clear error, and no work
is lost. One test (or a parametrized family) per item of the issue, numbered as there; the kill -9 matrix
is in test_reliability_kill.py. docs/reliability.md maps each fault to its test.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmkit import models, preflight
from nmkit.cli import main
from nmkit.errors import UserError
from nmkit.evaluate import ppl_of
from nmkit.jsonout import dumps
from nmkit.outputs import remove_stale, write_failure
from nmkit.patterns import NM, PatternError
from nmkit.solvers import nm_mask

WEIGHTS = "model.safetensors"


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str) -> str:
    """The CLI's user-error contract: exit 2, a last line ``nmkit CMD: error: ...``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"nmkit {command}: error:"), err
    return last


def strict_json(text: str):
    """json.loads that rejects the NaN/Infinity tokens Python's json would otherwise accept."""
    def bad(token):
        raise ValueError(f"invalid JSON token {token}")
    return json.loads(text, parse_constant=bad)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(directory: Path, edit) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def prune_args(model, out, data, *extra) -> list:
    return ["prune", model, "--out", out, "--data-dir", data, "--no-eval", *extra]


CALIBRATED = ["--method", "sparsegpt", "--calib-samples", "4", "--calib-seqlen", "32"]


@pytest.fixture(scope="module")
def pruned_24(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "pruned"
    assert main(prune_args(str(tiny_model_dir), str(out), str(tiny_data_dir))) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: the error must come before any heavy work."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(models, "load", refuse)


# ---- 1. corrupt or incomplete model directories -------------------------------------------------

def _truncate(d: Path):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _random(d: Path):
    (d / WEIGHTS).write_bytes(os.urandom(4096))


def _bad_config(d: Path):
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')


def _no_weights(d: Path):
    (d / WEIGHTS).unlink()


def _no_tokenizer(d: Path):
    (d / "tokenizer.json").unlink()


DEFECTS = {"truncated weights": (_truncate, "truncated"), "random weights": (_random, "not a valid safetensors"),
           "malformed config.json": (_bad_config, "config.json is not valid JSON"),
           "missing weights": (_no_weights, "has no weights"), "missing tokenizer": (_no_tokenizer, "no tokenizer")}


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_item1_damaged_model_dir_is_one_line_before_loading(defect, command, tiny_model_dir, tiny_data_dir,
                                                            tmp_path, capsys, no_model_load):
    damage, message = DEFECTS[defect]
    model = copy_model(tiny_model_dir, tmp_path / "model")
    damage(model)
    args = (prune_args(model, tmp_path / "out", tiny_data_dir, "--method", "magnitude") if command == "prune"
            else ["eval", model, "--data-dir", tiny_data_dir])
    code, _, err = run(args, capsys)
    assert message in one_line_error(code, err, command)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defect", ["truncated weights", "random weights", "missing weights"])
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_item1_damaged_pruned_dir_in_inspect_and_export(defect, command, pruned_24, tmp_path, capsys):
    damage, message = DEFECTS[defect]
    src = copy_model(pruned_24, tmp_path / "pruned")
    damage(src)
    args = ["inspect", src] if command == "inspect" else ["export", src, "--format", "nmkit", "--out", tmp_path / "o"]
    code, _, err = run(args, capsys)
    assert message in one_line_error(code, err, command)


def test_item1_malformed_sidecar(pruned_24, tmp_path, capsys):
    src = copy_model(pruned_24, tmp_path / "pruned")
    (src / "nmkit.json").write_text("{not json")
    for args in (["inspect", src], ["eval", src], ["export", src, "--format", "dense", "--out", tmp_path / "o"]):
        code, _, err = run(args, capsys)
        assert "nmkit.json is not valid JSON" in one_line_error(code, err, args[0])


# ---- 2. unwritable --out, found before the prune -----------------------------------------------

def test_item2_unwritable_out_fails_before_loading(tiny_model_dir, tiny_data_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile" / "out", "is a file"), ("", "--out is empty")):
        code, _, err = run(prune_args(tiny_model_dir, out, tiny_data_dir), capsys)
        assert message in one_line_error(code, err, "prune")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (root only); skipped where mounting is not allowed. Always unmounted."""
    mounted = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_item2_read_only_mount(tiny_model_dir, tiny_data_dir, tmp_path, capsys, no_model_load, mount_tmpfs):
    ro = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    code, _, err = run(prune_args(tiny_model_dir, ro / "out", tiny_data_dir), capsys)
    assert "is not writable" in one_line_error(code, err, "prune")


# ---- 3. disk full: a clear error, and the checkpoint survives a failed save -----------------------

def test_item3_disk_full_during_save_keeps_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = prune_args(tiny_model_dir, out, tiny_data_dir, *CALIBRATED)
    monkeypatch.setenv("NMKIT_FAULT", "during-save:enospc")
    code, _, err = run(args, capsys)
    last = one_line_error(code, err, "prune")
    assert "No space left on device" in last and "--resume" in last
    ckpt = tmp_path / "out.nmkit-ckpt"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["next_block"] == 2  # every block's work is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nmkit-ckpt"]  # no partial output
    monkeypatch.delenv("NMKIT_FAULT")
    import nmkit.oneshot.sequential as sequential

    blocks_pruned = []
    monkeypatch.setattr(sequential, "collect_block_stats", lambda *a, **k: blocks_pruned.append(1))
    code, _, err = run(args + ["--resume"], capsys)
    assert code == 0, err
    assert blocks_pruned == []  # resumed with every block done: nothing pruned again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_item3_disk_full_writing_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = prune_args(tiny_model_dir, out, tiny_data_dir, *CALIBRATED)
    monkeypatch.setenv("NMKIT_FAULT", "between-files-1:enospc")
    code, _, err = run(args, capsys)
    last = one_line_error(code, err, "prune")
    assert "cannot write the checkpoint" in last and "--resume" in last
    assert json.loads((tmp_path / "out.nmkit-ckpt" / "state.json").read_text())["next_block"] == 1
    monkeypatch.delenv("NMKIT_FAULT")
    assert run(args + ["--resume"], capsys)[0] == 0


def test_item3_disk_full_in_export(pruned_24, tmp_path, capsys, monkeypatch):
    import nmkit.formats.checkpoint as checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    code, _, err = run(["export", pruned_24, "--format", "nmkit", "--out", tmp_path / "o"], capsys)
    assert "No space left on device" in one_line_error(code, err, "export")
    assert list(tmp_path.iterdir()) == []


def test_item3_real_full_disk(tiny_model_dir, tiny_data_dir, tmp_path, capsys, mount_tmpfs):
    """On a real 256 KiB filesystem: the pre-flight estimate refuses the prune up front, and the exception a
    full disk raises inside safetensors is recognised as one."""
    small = mount_tmpfs(tmp_path / "small", "size=256k")
    code, _, err = run(prune_args(tiny_model_dir, small / "out", tiny_data_dir), capsys)
    assert "not enough disk space" in one_line_error(code, err, "prune")
    with pytest.raises(Exception) as info:
        save_file({"w": torch.zeros(200_000)}, str(small / "x.safetensors"))
    assert write_failure(info.value) == "No space left on device"


# ---- 4. non-finite weights are refused, naming the layer ----------------------------------------

@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_item4_non_finite_weight_names_the_layer(method, value, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    edit_weights(model, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 5), value))
    extra = ["--method", method] + (CALIBRATED[2:] if method != "magnitude" else [])
    code, _, err = run(prune_args(model, tmp_path / "out", tiny_data_dir, *extra), capsys)
    last = one_line_error(code, err, "prune")
    assert "model.layers.1.mlp.up_proj" in last and "non-finite" in last


def test_item4_nan_scores_name_the_layer(tiny_model_dir):
    """NaN from activations (finite weights) in the calibrated pipeline names the layer too."""
    from nmkit.oneshot import prune

    model = models.load(str(tiny_model_dir))
    model.model.layers[0].input_layernorm.weight.data.fill_(math.nan)  # not a target: activations go NaN
    with pytest.raises(UserError, match=r"layer model\.layers\.0\.\S+: its calibration inputs contain NaN"):
        prune(model, "2:4", "sparsegpt", calibration=torch.randint(0, 300, (2, 16)), progress=False)


# ---- 5. perplexity overflow is inf, not a crash ------------------------------------------------

def test_item5_perplexity_overflow_is_inf(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    assert ppl_of(800.0) == math.inf and ppl_of(1.0) == math.e
    model = copy_model(tiny_model_dir, tmp_path / "model")
    edit_weights(model, lambda t: t["lm_head.weight"].mul_(1e6))  # mean NLL far above 709
    code, out, err = run(["eval", model, "--data-dir", tiny_data_dir, "--eval-seqlen", "32", "--eval-windows", "2",
                          "--json"], capsys)
    assert code == 0, err
    result = strict_json(out)
    assert result["ppl"] is None and result["nll"] > 709  # 7: inf is written as null
    code, out, err = run(["eval", model, "--data-dir", tiny_data_dir, "--eval-seqlen", "32", "--eval-windows", "2"],
                         capsys)
    assert code == 0 and "perplexity inf" in out


# ---- 6. the calibration request is bounded by the data and memory, before loading ----------------

def test_item6_calibration_beyond_the_text_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys,
                                                      no_model_load):
    args = prune_args(tiny_model_dir, tmp_path / "out", tiny_data_dir, "--method", "wanda",
                      "--calib-samples", "100000", "--calib-seqlen", "512")
    code, _, err = run(args, capsys)
    last = one_line_error(code, err, "prune")
    assert "51200000 tokens" in last and "--calib-samples" in last


def test_item6_calibration_beyond_memory_is_refused(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**30)
    preflight.check_activation_memory(64, 512, 576)  # 75 MiB: fine
    with pytest.raises(UserError, match=r"needs about 2\.2 GiB .* 1\.0 GiB available"):
        preflight.check_activation_memory(128, 1024, 2304)


# ---- 7. JSON outputs are always valid ---------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--permute-budget", "nan"), ("--permute-budget", "inf"),
                                         ("--damp", "nan")])
def test_item7_non_finite_flags_are_refused(flag, value, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code, _, err = run(prune_args(tiny_model_dir, tmp_path / "out", tiny_data_dir, flag, value), capsys)
    assert f"{flag} must be a finite number" in one_line_error(code, err, "prune")


def test_item7_dumps_writes_non_finite_as_null():
    text = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (2, "x")})
    assert strict_json(text) == {"a": None, "b": [None, None, 1.5], "c": [2, "x"]}


def test_item7_report_json_is_valid_with_infinite_perplexity(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    edit_weights(model, lambda t: t["lm_head.weight"].mul_(1e6))
    out = tmp_path / "out"
    code, stdout, err = run(["prune", model, "--out", out, "--data-dir", tiny_data_dir, "--eval-seqlen", "32",
                             "--eval-windows", "2", "--json"], capsys)
    assert code == 0, err
    report = strict_json((out / "report.json").read_text())
    assert report["ppl_dense"] is None and strict_json(stdout)["ppl_sparse"] is None


# ---- 8, 10. --resume refuses other weights and damaged checkpoints ---------------------------------

@pytest.fixture
def interrupted(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    """A calibrated prune interrupted (Ctrl-C) after block 0 was committed: (model dir, args, checkpoint)."""
    model = copy_model(tiny_model_dir, tmp_path / "model")
    args = prune_args(model, tmp_path / "out", tiny_data_dir, *CALIBRATED)
    monkeypatch.setenv("NMKIT_FAULT", "after-commit-0:interrupt")
    assert run(args, capsys)[0] == 130
    monkeypatch.delenv("NMKIT_FAULT")
    return model, args, tmp_path / "out.nmkit-ckpt"


def test_item8_resume_refuses_replaced_weights(interrupted, capsys):
    model, args, ckpt = interrupted
    edit_weights(model, lambda t: t["model.layers.1.self_attn.q_proj.weight"].mul_(1.001))  # same path, new weights
    code, _, err = run(args + ["--resume"], capsys)
    last = one_line_error(code, err, "prune")
    assert "model weights" in last and str(ckpt) in last


def test_item8_resume_refuses_other_arguments(interrupted, capsys):
    _, args, _ = interrupted
    code, _, err = run(args + ["--resume", "--calib-seed", "1"], capsys)
    assert "--calib-seed" in one_line_error(code, err, "prune")


@pytest.mark.parametrize("damage", ["truncated streams", "missing block", "malformed state", "flipped byte"])
def test_item10_damaged_checkpoint_is_one_line(damage, interrupted, capsys):
    _, args, ckpt = interrupted
    streams = next(ckpt.glob("streams-*.pt"))
    if damage == "truncated streams":
        streams.write_bytes(streams.read_bytes()[:100])
    elif damage == "missing block":
        (ckpt / "block-0000.safetensors").unlink()
    elif damage == "malformed state":
        (ckpt / "state.json").write_text('{"config": ')
    else:
        data = bytearray((ckpt / "block-0000.safetensors").read_bytes())
        data[-1] ^= 1
        (ckpt / "block-0000.safetensors").write_bytes(bytes(data))
    code, _, err = run(args + ["--resume"], capsys)
    last = one_line_error(code, err, "prune")
    assert "is damaged" in last and "without --resume" in last


# ---- 11. finetune: bad learning rates and divergence ----------------------------------------------

def _finetune(argv: list, capsys) -> tuple[int, str]:
    code = main(["finetune", *[str(a) for a in argv]])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("lr, message", [("nan", "--lr must be a finite number > 0"),
                                         ("-1", "--lr must be a finite number > 0"),
                                         ("1e30", "diverged")])
def test_item11_finetune_bad_or_diverging_lr(lr, message, pruned_24, tiny_data_dir, tmp_path, capsys):
    code, err = _finetune([pruned_24, "--steps", "3", "--batch", "1", "--seqlen", "32", "--lr", lr, "--no-eval",
                           "--data-dir", tiny_data_dir, "--out", tmp_path / "ft"], capsys)
    last = one_line_error(code, err, "finetune")
    assert message in last and "bug" not in last
    assert not (tmp_path / "ft").exists()


# ---- 12. a tied lm_head is not pruned through the embedding -------------------------------------

def test_item12_tied_lm_head_is_refused(tiny_data_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    with pytest.raises(UserError, match=r"layer lm_head shares its weight with model\.embed_tokens\.weight"):
        from nmkit.oneshot import prune

        prune(models.load(str(tmp_path / "tied")), "2:4", include=["lm_head"], progress=False)


# ---- 13. every format nmkit writes, nmkit reads back ----------------------------------------------

def test_item13_compressed_tensors_24_reads_back(pruned_24, tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as on a machine without it
    out = tmp_path / "ct24"
    assert run(["export", pruned_24, "--format", "compressed-tensors-24", "--out", out], capsys)[0] == 0
    code, stdout, err = run(["inspect", out, "--json"], capsys)
    assert code == 0, err
    assert all(r["valid"] and r["sparsity"] == 0.5 for r in strict_json(stdout))
    loaded = models.load(str(out)).state_dict()
    for name, w in load_file(pruned_24 / WEIGHTS).items():
        assert torch.equal(loaded[name], w), name
    code, stdout, err = run(["eval", out, "--data-dir", tiny_data_dir, "--eval-seqlen", "32", "--eval-windows", "2"],
                            capsys)
    code0, stdout0, _ = run(["eval", pruned_24, "--data-dir", tiny_data_dir, "--eval-seqlen", "32",
                             "--eval-windows", "2"], capsys)
    assert code == code0 == 0 and stdout.split("perplexity")[1] == stdout0.split("perplexity")[1]


# ---- 14. export --format dense checks the pattern ----------------------------------------------

@pytest.mark.parametrize("fmt", ["dense", "nmkit", "compressed-tensors-24"])
def test_item14_export_refuses_a_broken_pattern_naming_the_layer(fmt, pruned_24, tmp_path, capsys):
    src = copy_model(pruned_24, tmp_path / "pruned")
    edit_weights(src, lambda t: t["model.layers.0.mlp.up_proj.weight"][0, :4].fill_(1.0))  # 4 non-zeros of 4
    code, _, err = run(["export", src, "--format", fmt, "--out", tmp_path / "o"], capsys)
    assert "layer model.layers.0.mlp.up_proj" in one_line_error(code, err, "export")
    assert not (tmp_path / "o").exists()


# ---- 15. temporaries of killed runs are removed by the next run (kill -9 itself: test_reliability_kill) ---

def test_item15_stale_temporaries_are_removed_live_ones_kept(pruned_24, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".o.tmp-{dead_pid}-abcd1234"
    live = tmp_path / f".o.tmp-{os.getpid()}-abcd1234"
    other = tmp_path / f".other.tmp-{dead_pid}-abcd1234"
    for d in (stale, live, other):
        d.mkdir()
        (d / "big.safetensors").write_bytes(b"x" * 1000)
    code, _, err = run(["export", pruned_24, "--format", "dense", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "left by an interrupted export" in err
    assert not stale.exists() and live.exists() and other.exists() and (tmp_path / "o").is_dir()


def test_item15_killed_between_renames_restores_the_old_output(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    old = tmp_path / f".o.old-{dead}-abcd1234"
    old.mkdir()
    (old / "report.json").write_text("{}")
    assert remove_stale(tmp_path / "o") == [] and (tmp_path / "o" / "report.json").is_file()


# ---- wording -------------------------------------------------------------------------------------

def test_wording_tail_error_names_the_cli_flag(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code, _, err = run(prune_args(tiny_model_dir, tmp_path / "out", tiny_data_dir, "--pattern", "2:5"), capsys)
    last = one_line_error(code, err, "prune")
    assert "--tail pad" in last and "layer model.layers.0" in last


def test_wording_nm_parse_of_a_valid_non_nm_pattern():
    with pytest.raises(PatternError) as info:
        NM.parse("50%")
    assert "valid pattern" in str(info.value) and "not N:M" in str(info.value)


def test_wording_nm_mask_of_a_scalar():
    with pytest.raises(PatternError, match="0-d tensor"):
        nm_mask(torch.tensor(1.0), "2:4")


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    with pytest.raises(PatternError):
        main(["--debug", "prune", str(tiny_model_dir), "--pattern", "4:2", "--out", str(tmp_path / "o")])
