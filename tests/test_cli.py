"""End to end: `nmkit prune | eval | inspect` on a tiny Llama built in the test."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmkit.cli import main
from nmkit.patterns import NM


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    code = main(["prune", str(tiny_model_dir), "--pattern", "2:8", "--out", str(out), "--eval-seqlen", "64",
                 "--eval-windows", "2", "--data-dir", str(tiny_data_dir), "--json"])
    assert code == 0
    return out


def test_prune_writes_reloadable_valid_model(pruned_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((pruned_dir / "report.json").read_text())
    for key in ("model", "pattern", "method", "ppl_dense", "ppl_sparse", "eval", "layers", "timings"):
        assert key in report
    assert report["pattern"] == "2:8" and report["method"] == "magnitude"
    assert set(report["eval"]) >= {"dataset", "source", "seqlen", "windows", "tokens"}
    assert report["eval"]["seqlen"] == 64 and report["eval"]["windows"] == 2
    assert set(report["timings"]) == {"load_s", "prune_s", "prune_cpu_s", "eval_s"}
    # 2 blocks x 7 projections; embeddings and LM head untouched by default.
    names = [layer["name"] for layer in report["layers"]]
    assert len(names) == 14 and not any("embed" in n or "lm_head" in n for n in names)
    assert (pruned_dir / "report.md").read_text().startswith("# nmkit prune")

    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    AutoTokenizer.from_pretrained(pruned_dir)
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight
        assert NM(2, 8).is_valid(w, dim=-1), name
        assert (w == 0).float().mean().item() >= 0.75
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(dense.model.embed_tokens.weight, model.model.embed_tokens.weight)
    sidecar = json.loads((pruned_dir / "nmkit.json").read_text())
    assert sidecar["layers"][names[0]] == {"pattern": "2:8", "dim": 1, "shape": [64, 64]}


def test_inspect_reads_weights_and_catches_tampering(pruned_dir, tmp_path, capsys):
    code, out, _ = run(["inspect", pruned_dir], capsys)
    assert code == 0 and "14 layers, 0 invalid" in out
    code, out, _ = run(["inspect", pruned_dir, "--json"], capsys)
    assert all(r["valid"] for r in json.loads(out))

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pruned_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, :8] = 1.0
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run(["inspect", bad], capsys)
    assert code == 1 and "1 invalid" in out


def test_eval_command(pruned_dir, tiny_data_dir, capsys):
    code, out, _ = run(["eval", pruned_dir, "--eval-seqlen", "64", "--eval-windows", "2", "--data-dir",
                        tiny_data_dir, "--json"], capsys)
    report = json.loads((pruned_dir / "report.json").read_text())
    assert code == 0 and json.loads(out)["ppl"] == pytest.approx(report["ppl_sparse"], rel=1e-5)


def test_eval_of_a_directory_reproduces_its_report_by_default(pruned_dir, tiny_data_dir, capsys):
    code, out, err = run(["eval", pruned_dir, "--data-dir", tiny_data_dir, "--json"], capsys)
    report = json.loads((pruned_dir / "report.json").read_text())
    result = json.loads(out)
    assert code == 0 and "protocol from" in err and result["eval"]["windows"] == 2
    assert result["ppl"] == pytest.approx(report["ppl_sparse"], rel=1e-5)
    code, out, _ = run(["eval", pruned_dir, "--data-dir", tiny_data_dir, "--eval-windows", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["eval"]["windows"] == 1
    code, _, err = run(["eval", pruned_dir, "--data-dir", tiny_data_dir, "--eval-seqlen", "0"], capsys)
    assert code == 2 and "--eval-seqlen must be >= 2" in err


def test_eval_with_run_time_sparsity(tiny_model_dir, tiny_data_dir, capsys):
    common = ["eval", tiny_model_dir, "--eval-seqlen", "64", "--eval-windows", "2", "--data-dir", tiny_data_dir,
              "--json"]
    code, out, _ = run(common, capsys)
    plain = json.loads(out)["ppl"]
    code, out, _ = run([*common, "--attention", "2:4", "--attention-layers", "0-1", "--activations", "4:8",
                        "--baseline"], capsys)
    result = json.loads(out)
    assert code == 0 and result["attention"] == "2:4" and result["attention_layers"] == [0, 1]
    assert result["activations"] == "4:8" and result["ppl_baseline"] == pytest.approx(plain, rel=1e-6)
    assert result["ppl_ratio"] == pytest.approx(result["ppl"] / plain) and result["ppl"] != plain


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attention-layers", "0"], "needs --attention"),
        (["--attention", "2:4", "--attention-layers", "a-b"], "layer numbers and ranges"),
        (["--attention", "2:4", "--attention-layers", "5"], "do not exist"),
        (["--baseline"], "add --attention or --activations"),
        (["--attention", "3:2"], "keep N of every M"),
        (["--activations", "3:5"], "not a multiple of M=5"),
    ],
)
def test_eval_bad_run_time_sparsity_exits_2(tiny_model_dir, tiny_data_dir, capsys, extra, message):
    code, _, err = run(["eval", tiny_model_dir, "--eval-seqlen", "64", "--eval-windows", "1", "--data-dir",
                        tiny_data_dir, *extra], capsys)
    assert code == 2 and message in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pattern", "4:2"], "keep N of every M"),
        (["--pattern", "2:0"], "keep N of every M"),
        (["--pattern", "abc"], "keep N of every M"),
        (["--method", "nope"], "unknown --method"),
        (["--include", "no.such.layer*"], "no layers selected"),
        (["--method", "sparsegpt", "--model-epochs", "2"], "needs a *-block method"),
        (["--method", "admm-block", "--model-epochs", "-1"], "--model-epochs must be >= 0"),
    ],
)
def test_bad_input_exits_2_without_output(tiny_model_dir, tiny_data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = run(["prune", tiny_model_dir, "--out", out, "--data-dir", tiny_data_dir, *extra], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("nmkit prune: error:") and message in last
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_paths_exit_2(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", tmp_path / "missing-model", "--out", out], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "emptydata").mkdir()
    code, _, err = run(["prune", tiny_model_dir, "--out", out, "--data-dir", tmp_path / "emptydata"], capsys)
    assert code == 2 and "no WikiText-2 raw files" in err
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(["prune", tiny_model_dir, "--out", out, "--data-dir", tiny_data_dir], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "precious"


def test_failure_midway_leaves_no_output(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    import nmkit.sidecar

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nmkit.sidecar, "write", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        main(["--debug", "prune", str(tiny_model_dir), "--out", str(out), "--data-dir", str(tiny_data_dir),
              "--no-eval"])
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nmkit.cli", "prune", "--pattern", "4:2", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "keep N of every M" in proc.stderr


def test_dense_perplexity_cache(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NMKIT_NO_PPL_CACHE")
    monkeypatch.setenv("NMKIT_CACHE", str(tmp_path / "cache"))
    args = ["prune", tiny_model_dir, "--eval-seqlen", "64", "--eval-windows", "2", "--data-dir", tiny_data_dir,
            "--json"]
    code, first, err1 = run([*args, "--out", tmp_path / "a"], capsys)
    code2, second, err2 = run([*args, "--pattern", "1:4", "--out", tmp_path / "b"], capsys)
    assert code == code2 == 0 and "from cache" not in err1 and "from cache" in err2
    assert json.loads(first)["ppl_dense"] == json.loads(second)["ppl_dense"]
    code, third, err3 = run([*args[:-1], "--eval-windows", "3", "--out", tmp_path / "c"], capsys)
    assert "from cache" not in err3  # another protocol is another key


def test_export_compressed_then_inspect_and_load(pruned_dir, tmp_path, capsys):
    import nmkit

    out = tmp_path / "compressed"
    code, _, err = run(["export", pruned_dir, "--format", "nmkit", "--out", out], capsys)
    assert code == 0, err
    code, text, _ = run(["inspect", out], capsys)
    assert code == 0 and "14 layers, 0 invalid" in text
    model = nmkit.load(str(out))
    assert sum(isinstance(m, nmkit.SparseLinear) for m in model.modules()) == 14
    dense = nmkit.load(str(pruned_dir))
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_prune_help_lists_the_method_records(capsys):
    """--method's help comes from the Method records: every method is listed, the deleted one is not."""
    from nmkit.oneshot.methods import METHODS

    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse may wrap anywhere, even at a hyphen
    assert all(f"{name}(" in text for name in METHODS)
    assert "sparsegpt-ec" not in text
