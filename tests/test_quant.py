"""Quantized N:M: GPTQ with the mask fixed, the nmkit-quantized directory format, `nmkit quantize` and
`nmkit prune --quant`."""

from __future__ import annotations

import json

import pytest
import torch

from nmkit import models, sidecar
from nmkit.cli import main
from nmkit.patterns import NM
from nmkit.quant import QuantSpec
from nmkit.quant.gptq import quantize_layer, quantize_model, round_to_nearest
from nmkit.quant.storage import bits_per_weight, packed_layer, read_packed, write_quantized
from nmkit.runtime.bench import main as bench_main
from nmkit.runtime.engine import Engine
from nmkit.runtime.pack import pack
from nmkit.solvers.nm import nm_mask
from tests.test_runtime import _tiny_llama


def _layer(rows: int, cols: int, pattern: NM, seed: int = 0):
    """A pruned weight and correlated calibration inputs (GPTQ's feedback only helps when inputs correlate)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w * nm_mask(w.abs(), pattern)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    x = torch.randn(4 * cols, cols, generator=g) @ mix
    return w, x


SPECS = [QuantSpec(8, 1), QuantSpec(4, 1), QuantSpec(4, 2), QuantSpec(4, 4)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s}g{s.group_blocks}")
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8)], ids=str)
def test_gptq_keeps_the_mask_and_codes_in_range(pattern, spec):
    w, x = _layer(24, 320, pattern)  # 5 blocks: a partial last scale group for group_blocks 2 and 4
    q = quantize_layer(w, x.T @ x, pattern, spec)
    assert torch.equal(q.keep, w != 0)
    assert q.codes.shape == (24, 5, 64 * pattern.keep // pattern.group)
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    assert q.scales.dtype == torch.float16 and q.scales.shape == (24, -(-5 // spec.group_blocks))
    wq = q.dequantized()
    assert bool((wq[~q.keep] == 0).all())
    # the codes and scales are what the packed layout stores: packing them loses nothing
    assert torch.equal(packed_layer(q).dense_weight(), wq)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s}g{s.group_blocks}")
def test_gptq_output_error_below_round_to_nearest(spec):
    pattern = NM(2, 4)
    w, x = _layer(48, 256, pattern, seed=1)
    h = x.T @ x
    gptq = quantize_layer(w, h, pattern, spec).dequantized()
    rtn = round_to_nearest(w, pattern, spec, importance=h.diagonal()).dequantized()
    err = lambda wq: torch.linalg.norm((wq - w) @ x.T)  # noqa: E731
    assert err(gptq) < err(rtn)


def test_quantize_model_writes_back_quantized_weights():
    pattern = NM(2, 4)
    model = _tiny_llama(pattern)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, calib, QuantSpec(4, 1), progress=False)
    assert len(result.layers) == 14
    for name, layer in result.layers.items():
        assert layer.pattern == pattern
        assert torch.equal(model.get_submodule(name).weight, layer.dequantized())
        assert 0 < result.rel_errors[name] < 0.5


@pytest.mark.parametrize("kind,group_blocks", [("int8", 1), ("int4", 1), ("int4", 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_storage_round_trip_is_bit_exact(tmp_path, kind, group_blocks, bias):
    model = _tiny_llama(NM(2, 4), bias=bias)
    mats = {}
    for i, layer in enumerate(model.model.layers):
        for part in ("self_attn", "mlp"):
            for pname, mod in getattr(layer, part).named_children():
                if isinstance(mod, torch.nn.Linear):
                    mats[f"model.layers.{i}.{part}.{pname}"] = pack(mod.weight, kind, NM(2, 4), bias=mod.bias,
                                                                   group_blocks=group_blocks)
    meta = {"layers": {n: {"pattern": "2:4", "dim": 1, "shape": [m.rows, m.cols]} for n, m in mats.items()},
            "quant": {"version": 1}}
    out = tmp_path / "q"
    write_quantized(out, model, mats, meta)
    write_quantized(out, model, mats, meta)  # replacing a directory leaves no temporary or old copy behind
    assert sidecar.stores_quantized(out) and [p.name for p in tmp_path.iterdir()] == ["q"]
    back, _, stored_meta = read_packed(out)
    assert back.keys() == mats.keys()
    for name, m in mats.items():
        b = back[name]
        assert (b.kind, b.rows, b.cols, b.pattern, b.group_blocks) == (m.kind, m.rows, m.cols, m.pattern,
                                                                       m.group_blocks)
        for part in ("values", "mask", "scales", "bias"):
            x, y = getattr(m, part), getattr(b, part)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), part
        assert stored_meta["layers"][name]["bits_per_weight"] == round(bits_per_weight(m), 4)
    # nmkit.load gives the dequantized weights; the engine built from the stored codes equals one packed from them
    loaded = models.load(str(out))
    for name, m in mats.items():
        assert torch.equal(loaded.get_submodule(name).weight, m.dense_weight())
    ids = torch.arange(1, 17)
    direct = Engine(model, weights=kind, head="fp32", max_seq=32, threads=1, packed=mats).forward(ids, True)
    stored = Engine(loaded, weights=kind, head="fp32", max_seq=32, threads=1, packed=back).forward(ids, True)
    assert torch.equal(direct, stored)


def test_bits_per_weight_of_2_4_int4():
    w = torch.randn(8, 1024)
    w = w * nm_mask(w.abs(), NM(2, 4))
    # values 2 bits, mask 1 bit, one fp16 scale per 32 (4 per 128) kept values
    assert bits_per_weight(pack(w, "int4", NM(2, 4), group_blocks=1)) == pytest.approx(2 + 1 + 16 / 64)
    assert bits_per_weight(pack(w, "int4", NM(2, 4), group_blocks=4)) == pytest.approx(2 + 1 + 16 / 256)


@pytest.fixture(scope="module")
def pruned_24(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "pruned"
    assert main(["prune", str(tiny_model_dir), "--pattern", "2:4", "--out", str(out), "--no-eval",
                 "--data-dir", str(tiny_data_dir)]) == 0
    return out


def test_quantize_command_end_to_end(pruned_24, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "w4"
    code = main(["quantize", str(pruned_24), "--quant", "w4", "--quant-group", "64", "--calib-samples", "4",
                 "--calib-seqlen", "32", "--data-dir", str(tiny_data_dir), "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == 4 and summary["group_blocks"] == 2 and summary["group_kept"] == 64
    meta = sidecar.read(out)
    assert meta["storage"] == "nmkit-quantized" and meta["quant"]["bits"] == 4
    assert json.loads((out / "report.json").read_text())["quant"]["bits_per_weight"] == summary["bits_per_weight"]
    mats, _, _ = read_packed(out)
    assert {m.kind for m in mats.values()} == {"int4"} and len(mats) == 14
    model = models.load(str(out))
    for name, m in mats.items():
        assert torch.equal(model.get_submodule(name).weight, m.dense_weight())
    code = main(["eval", str(out), "--eval-seqlen", "32", "--eval-windows", "1", "--data-dir", str(tiny_data_dir),
                 "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ppl"] > 1
    # the runtime benchmark runs the stored codes (bytes read per token: the packed layers as stored)
    assert bench_main([str(out), "--decode", "2", "--prefill", "4", "--reps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "2:4 int4" in result["label"]
    stored = sum(m.nbytes() for m in mats.values())
    assert result["weight_bytes_per_token"] > stored


def test_prune_with_quant_writes_a_quantized_dir(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "pq"
    code = main(["prune", str(tiny_model_dir), "--pattern", "2:4", "--method", "wanda", "--quant", "w8",
                 "--calib-samples", "4", "--calib-seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "1",
                 "--data-dir", str(tiny_data_dir), "--out", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"]["bits"] == 8 and report["quant"]["ppl"] > 1
    mats, _, meta = read_packed(out)
    assert meta["method"] == "wanda" and {m.kind for m in mats.values()} == {"int8"}
    assert all(m.pattern == NM(2, 4) for m in mats.values())


@pytest.mark.parametrize("extra,message", [
    (["--quant", "w3"], "unsupported --quant 'w3': choose w8 (INT8) or w4 (INT4)"),
    (["--quant", "w4", "--quant-group", "48"], "choose one of 32, 64, 128, 256, 512"),
    (["--quant", "w4", "--quant-group", "1024"], "choose one of 32, 64, 128, 256, 512"),
])
def test_bad_quant_input_exits_2_with_one_line_and_writes_nothing(pruned_24, tiny_model_dir, tiny_data_dir, tmp_path,
                                                                  capsys, extra, message):
    for argv in (["quantize", str(pruned_24)], ["prune", str(tiny_model_dir), "--pattern", "2:4"]):
        out = tmp_path / "never"
        code = main([*argv, *extra, "--data-dir", str(tiny_data_dir), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not out.exists() and not list(tmp_path.iterdir())
