"""Export formats (dense + sidecar, nmkit compressed, compressed-tensors-24) and loading them back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nmkit.compressed_model import load_compressed
from nmkit.errors import UserError
from nmkit.formats.io import export, read_ct24, read_pruned
from nmkit.nn import SparseLinear
from nmkit.solvers.nm import nm_mask


def _pruned_dir(tmp_path, pattern="2:4", dtype=torch.float32, hidden=64, name="src", heads=4, bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nmkit import sidecar

    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attention_bias=bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    layers = {}
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in n:
                mod.weight.mul_(nm_mask(mod.weight.abs(), pattern))
                layers[n] = {"pattern": pattern, "dim": 1, "shape": list(mod.weight.shape)}
        model.model.layers[0].mlp.up_proj.weight[0, 0] = -0.0  # a -0.0 to normalise in ct24
    path = tmp_path / name
    model.save_pretrained(path)
    sidecar.write(path, layers, pattern=pattern)
    return path, model


def _assert_same_greedy_tokens(model, loaded) -> None:
    ids = torch.randint(0, 300, (1, 5))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        out = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, out)


def test_dense_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = _pruned_dir(tmp_path)
    export(src, "dense", tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, 300, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / "dense" / "nmkit.json").read_text())["layers"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nmkit_round_trip_and_load(tmp_path, dtype):
    src, model = _pruned_dir(tmp_path, dtype=dtype)
    summary = export(src, "nmkit", tmp_path / "nm")
    assert summary["ratio"] < 1.0
    # Lossless: decompressing the nmkit directory gives the dense tensors bit for bit.
    a, _ = read_pruned(src)
    b, _ = read_pruned(tmp_path / "nm")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loaded = load_compressed(tmp_path / "nm")
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, SparseLinear)
    _assert_same_greedy_tokens(model, loaded)


def test_ct24_layout_and_round_trip(tmp_path):
    src, model = _pruned_dir(tmp_path)
    export(src, "compressed-tensors-24", tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    p = "model.layers.0.mlp.up_proj"
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        shape, comp, bm = f.get_tensor(f"{p}.shape"), f.get_tensor(f"{p}.compressed"), f.get_tensor(f"{p}.bitmask")
    assert f"{p}.weight" not in keys and "model.norm.weight" in keys
    assert shape.dtype == torch.int64 and shape.shape == (2, 1) and shape.flatten().tolist() == [128, 64]
    assert comp.shape == (128, 32) and bm.dtype == torch.uint8 and bm.shape == (128, 8)
    dense = read_ct24(tmp_path / "ct")
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(dense[f"{p}.weight"], w)
    assert not torch.signbit(dense[f"{p}.weight"][0, 0])  # -0.0 normalised
    # exactly 2 kept per group of 4
    bits = ((bm.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(128, 16, 4).sum(-1)
    assert bool((bits == 2).all())


def test_ct24_validation_errors(tmp_path):
    src, _ = _pruned_dir(tmp_path, pattern="1:4")
    with pytest.raises(UserError, match="2:4 only"):
        export(src, "compressed-tensors-24", tmp_path / "ct")
    src, _ = _pruned_dir(tmp_path, hidden=68, name="odd", heads=2)  # 68 % 8 != 0
    with pytest.raises(UserError, match="% 8"):
        export(src, "compressed-tensors-24", tmp_path / "ct2")


def test_export_needs_sidecar(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="nmkit.json"):
        export(tmp_path / "x", "nmkit", tmp_path / "y")


def test_export_command(tmp_path, capsys):
    import argparse

    from nmkit.commands import export as cmd

    src, _ = _pruned_dir(tmp_path)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert cmd.run(p.parse_args([str(src), "--format", "nmkit", "--out", str(tmp_path / "o")])) == 0
    assert "the dense tensors" in capsys.readouterr().out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nmkit_zstd_codec_round_trip_and_load(tmp_path, dtype):
    src, model = _pruned_dir(tmp_path, dtype=dtype)
    plain = export(src, "nmkit", tmp_path / "nm")
    coded = export(src, "nmkit", tmp_path / "nmz", codec="zstd")
    assert coded["codec"] == "zstd" and coded["bytes"] < plain["bytes"]
    assert json.loads((tmp_path / "nmz" / "nmkit.json").read_text())["codec"] == "zstd"
    with safe_open(str(tmp_path / "nmz" / "model.safetensors"), "pt") as f:  # coded: uint8 blobs
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    a, _ = read_pruned(tmp_path / "nm")
    b, _ = read_pruned(tmp_path / "nmz")
    assert a.keys() == b.keys()
    for k in a:
        assert _bits_equal(a[k], b[k]), k
    loaded = load_compressed(tmp_path / "nmz")
    _assert_same_greedy_tokens(model, loaded)


def test_codec_only_for_nmkit_and_failed_export_leaves_nothing(tmp_path):
    src, _ = _pruned_dir(tmp_path, pattern="1:4")
    with pytest.raises(UserError, match="--format nmkit only"):
        export(src, "dense", tmp_path / "d", codec="zstd")
    with pytest.raises(UserError, match="unknown codec"):
        export(src, "nmkit", tmp_path / "d", codec="lz4")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="2:4 only"):  # fails half-way: the old output stays as it was
        export(src, "compressed-tensors-24", tmp_path / "ct")
    assert [p.name for p in (tmp_path / "ct").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    with pytest.raises(UserError, match="overwrite its source"):
        export(src, "dense", src)


def test_export_replaces_existing_output(tmp_path):
    src, _ = _pruned_dir(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "stale.safetensors").write_bytes(b"x")
    export(src, "dense", tmp_path / "o")
    assert not (tmp_path / "o" / "stale.safetensors").exists()
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt,codec", [("dense", "none"), ("nmkit", "none"), ("nmkit", "zstd"),
                                       ("compressed-tensors-24", "none")])
def test_sharded_export_round_trips(tmp_path, fmt, codec):
    """Small shards: several files plus an index; every reader sees the same tensors as one file."""
    src, model = _pruned_dir(tmp_path)
    one = export(src, fmt, tmp_path / "one", codec=codec)
    many = export(src, fmt, tmp_path / "many", codec=codec, max_shard_bytes="40KB")
    assert one["bytes"] > 0 and (tmp_path / "one" / "model.safetensors").is_file()
    shards = sorted((tmp_path / "many").glob("*.safetensors"))
    assert many["files"] == len(shards) > 2 and one["files"] == 1
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    if fmt == "compressed-tensors-24":
        a, b = read_ct24(tmp_path / "one"), read_ct24(tmp_path / "many")
    else:
        a, b = read_pruned(tmp_path / "one")[0], read_pruned(tmp_path / "many")[0]
    assert a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 300, (1, 5))
    if fmt == "dense":  # transformers reads the sharded output as it is
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "many").eval()
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    if fmt == "nmkit":
        loaded = load_compressed(tmp_path / "many")
        with torch.inference_mode():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    if fmt != "compressed-tensors-24":  # a sharded directory exports again, to one file
        export(tmp_path / "many", "dense", tmp_path / "again")
        assert sorted(p.name for p in (tmp_path / "again").glob("*.safetensors*")) == ["model.safetensors"]
        c, _ = read_pruned(tmp_path / "again")
        assert all(_bits_equal(a[k], c[k]) for k in a)


def test_shard_size_errors(tmp_path):
    from nmkit.formats.checkpoint import parse_size

    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(7) == 7
    for bad in ("lots", "0", "5 parsecs"):
        with pytest.raises(UserError, match="size"):
            parse_size(bad)


def test_inspect_reads_every_export(tmp_path):
    """`nmkit inspect` sees the same valid masks in coded and sharded nmkit directories."""
    from nmkit.inspect import inspect_directory

    src, _ = _pruned_dir(tmp_path)
    export(src, "nmkit", tmp_path / "z", codec="zstd", max_shard_bytes="40KB")
    rows = inspect_directory(tmp_path / "z")
    assert rows and all(r["valid"] for r in rows)
    assert [r["sparsity"] for r in rows] == [r["sparsity"] for r in inspect_directory(src)]
