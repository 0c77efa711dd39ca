"""Quantized N:M: GPTQ with the mask fixed, the nmkit-quantized directory format, `nmkit quantize` and
`nmkit prune --quant`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmkit import models, sidecar
from nmkit.cli import main
from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.quant import QuantSpec
from nmkit.quant.gptq import least_squares_scales, quantize_layer, quantize_model, refine_codes, round_to_nearest
from nmkit.quant.nm_quant import fit_levels
from nmkit.quant.storage import (
    WEIGHTS,
    bits_per_weight,
    packed_layer,
    read_packed,
    stored_values,
    write_quantized,
)
from nmkit.runtime import native
from nmkit.runtime.bench import main as bench_main
from nmkit.runtime.engine import Engine
from nmkit.runtime.pack import from_codes, native_matmul, pack, reference_matmul
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


OPTIONS = [{}, {"act_order": True}, {"refit_scales": True}, {"refine": 2},
           {"act_order": True, "refit_scales": True, "refine": 2}]


def _output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = (wq - w).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("spec", [QuantSpec(4, 1), QuantSpec(4, 2), QuantSpec(8, 1)],
                         ids=lambda s: f"{s}g{s.group_blocks}")
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4)], ids=str)
def test_gptq_options_keep_the_pattern_exact_and_are_deterministic(pattern, spec, options):
    w, x = _layer(24, 320, pattern, seed=2)
    q = quantize_layer(w, x.T @ x, pattern, spec, **options)
    assert torch.equal(q.keep, w != 0)  # the same N:M mask, every group exactly N kept
    assert bool((q.keep.reshape(24, -1, pattern.group).sum(-1) == pattern.keep).all())
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    assert q.scales.dtype == torch.float16 and bool((q.scales.float() >= 0).all())
    assert torch.equal(packed_layer(q).dense_weight(), q.dequantized())
    again = quantize_layer(w, x.T @ x, pattern, spec, **options)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scales, q.scales)


def test_act_order_with_equal_input_energies_is_the_plain_sweep():
    # every diag(X^T X) equal: the stable order is the column order, so nothing may change
    w, _ = _layer(16, 256, NM(2, 4), seed=3)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(256, 256, generator=g)
    h = a @ a.T
    h.diagonal().fill_(float(h.diagonal().max()))  # raising the diagonal keeps it positive definite
    plain = quantize_layer(w, h, NM(2, 4), QuantSpec(4, 1))
    ordered = quantize_layer(w, h, NM(2, 4), QuantSpec(4, 1), act_order=True)
    assert torch.equal(plain.codes, ordered.codes) and torch.equal(plain.scales, ordered.scales)


@pytest.mark.parametrize("spec", [QuantSpec(4, 1), QuantSpec(4, 2)], ids=lambda s: f"g{s.group_blocks}")
def test_refine_codes_never_raises_the_output_error_and_is_a_fixed_point_of_itself(spec):
    w, x = _layer(32, 256, NM(2, 4), seed=4)
    h = x.T @ x
    q = quantize_layer(w, h, NM(2, 4), spec)
    errors = [_output_error(w, q.dequantized(), h)]
    for _ in range(4):
        refine_codes(q, w, h)
        errors.append(_output_error(w, q.dequantized(), h))
        assert torch.equal(q.dequantized()[~q.keep], torch.zeros(int((~q.keep).sum())))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0]


def test_refine_codes_step_is_the_best_single_code_change():
    # brute force: after a pass, no single +-1 move of a code in the last column (whose decision no later
    # step revisits) lowers the output error
    w, x = _layer(8, 64, NM(2, 4), seed=5)
    h = x.T @ x
    q = quantize_layer(w, h, NM(2, 4), QuantSpec(4, 1))
    refine_codes(q, w, h)
    base = _output_error(w, q.dequantized(), h)
    col = 63
    rows = torch.nonzero(q.keep[:, col]).flatten().tolist()
    index = q.keep.cumsum(1)[:, col] - 1  # position of (row, col) among the row's kept values
    for r in rows:
        for step in (-1, 1):
            codes = q.codes.clone().reshape(8, -1)
            k = int(index[r])
            if not q.spec.qmin <= int(codes[r, k]) + step <= q.spec.qmax:
                continue
            codes[r, k] += step
            trial = type(q)(q.pattern, q.spec, q.keep, codes.reshape(q.codes.shape), q.scales)
            assert _output_error(w, trial.dequantized(), h) >= base * (1 - 1e-6)


def test_least_squares_scales_match_a_dense_least_squares_solve():
    w, x = _layer(6, 192, NM(2, 4), seed=6)
    h = x.T @ x
    q = quantize_layer(w, h, NM(2, 4), QuantSpec(4, 1))
    scales = least_squares_scales(q, w, h)
    # row by row: columns = each group's codes, solved by lstsq on the outputs X^T
    for r in range(6):
        basis = torch.zeros(3, 192)
        full = torch.zeros(192)
        full[q.keep[r]] = q.codes[r].float().reshape(-1)
        for g in range(3):
            basis[g, 64 * g : 64 * (g + 1)] = full[64 * g : 64 * (g + 1)]
        sol = torch.linalg.lstsq((basis @ x.T).T.double(), (w[r] @ x.T).double().unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(scales[r].float(), sol.float().half().float(), rtol=2e-3)
    before = _output_error(w, q.dequantized(), h)
    q.scales = scales
    assert _output_error(w, q.dequantized(), h) <= before


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


def _kl_to(teacher_logits: torch.Tensor, model, calib: torch.Tensor) -> float:
    with torch.no_grad():
        log_s = torch.log_softmax(model(calib).logits.float(), -1)
    log_t = torch.log_softmax(teacher_logits, -1)
    return float(torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean())


@pytest.mark.parametrize("fit_grid", [False, True], ids=["uniform", "fitted"])
def test_model_fit_lowers_the_kl_to_the_unquantized_model_and_stays_on_the_grid(fit_grid):
    """--quant-epochs: the quantized model's logits end closer to the unquantized model's than GPTQ left
    them (measured here through the model itself), every weight is still code x fp16 scale on the layer's
    grid with the same mask, and the run is deterministic."""
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    teacher = _tiny_llama(NM(2, 4))
    with torch.no_grad():
        teacher_logits = teacher(calib).logits.float()
    swept, fitted, again = (_tiny_llama(NM(2, 4)) for _ in range(3))
    quantize_model(swept, calib, QuantSpec(4, 1), progress=False, fit_grid=fit_grid)
    result = quantize_model(fitted, calib, QuantSpec(4, 1), progress=False, fit_grid=fit_grid, model_epochs=3)
    fit = result.model_fit
    assert fit["objective"] == "kl" and fit["steps"] == 12 and fit["after"] < fit["before"]
    assert _kl_to(teacher_logits, fitted, calib) < _kl_to(teacher_logits, swept, calib)
    teacher_weights = dict(teacher.named_parameters())
    for name, layer in result.layers.items():
        weight = fitted.get_submodule(name).weight
        assert torch.equal(weight, layer.dequantized())
        assert torch.equal(layer.keep, teacher_weights[f"{name}.weight"] != 0)
        grid = layer.spec.levels if fit_grid else range(-8, 8)
        assert bool(torch.isin(layer.codes.long(), torch.tensor(list(grid))).all()), name
        assert layer.scales.dtype == torch.float16
    assert any(not torch.equal(fitted.get_submodule(n).weight, swept.get_submodule(n).weight) for n in result.layers)
    quantize_model(again, calib, QuantSpec(4, 1), progress=False, fit_grid=fit_grid, model_epochs=3)
    for (name, a), (_, b) in zip(fitted.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


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


def test_fit_levels_gives_16_distinct_sorted_int8_levels_deterministically():
    w, x = _layer(32, 256, NM(2, 4), seed=7)
    kept = w[w != 0].reshape(32, 4, 32)
    imp = (x * x).sum(0).expand(32, 256)[w != 0].reshape(32, 4, 32)
    levels = fit_levels(kept, imp)
    assert len(levels) == 16 and list(levels) == sorted(set(levels)) and -127 <= levels[0] and levels[-1] <= 127
    assert max(abs(levels[0]), abs(levels[-1])) == 127 and fit_levels(kept, imp) == levels
    # N:M keeps the large weights: the fitted table spends no level on the empty middle
    assert min(abs(v) for v in levels) > 127 / 16


@pytest.mark.parametrize("spec", [QuantSpec(4, 1), QuantSpec(4, 2)], ids=lambda s: f"g{s.group_blocks}")
def test_fitted_grid_keeps_the_pattern_round_trips_and_lowers_the_error(spec):
    w, x = _layer(32, 256, NM(2, 4), seed=8)
    h = x.T @ x
    uniform = quantize_layer(w, h, NM(2, 4), spec)
    fitted = quantize_layer(w, h, NM(2, 4), spec, fit_grid=True)
    assert fitted.spec.levels is not None and torch.equal(fitted.keep, w != 0)
    assert bool(torch.isin(fitted.codes.long(), torch.tensor(fitted.spec.levels)).all())
    assert _output_error(w, fitted.dequantized(), h) < _output_error(w, uniform.dequantized(), h)
    mat = packed_layer(fitted)
    assert mat.kind == "int4" and mat.values.dtype == torch.uint8 and torch.equal(mat.codes(), fitted.codes)
    assert torch.equal(mat.dense_weight(), fitted.dequantized())
    # the C kernels read the table themselves: every ISA path equals the reference
    xs = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    if native.available():
        ref = reference_matmul(mat, xs)
        for isa in native.supported_isas():
            y = native_matmul(mat, xs, native.ISAS.index(isa))
            assert float((y - ref).abs().max() / ref.abs().max()) < 2e-5, isa
    with pytest.raises(UserError, match="not levels"):
        from_codes(fitted.codes.clamp(-8, 7), fitted.scales, fitted.keep, NM(2, 4), 4, spec.group_blocks,
                   levels=fitted.spec.levels)


def test_levels_storage_round_trip_is_bit_exact_and_runs(tmp_path):
    model = _tiny_llama(NM(2, 4))
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, calib, QuantSpec(4, 1), progress=False, fit_grid=True, refine=1)
    mats = {n: packed_layer(layer, model.get_submodule(n).bias) for n, layer in result.layers.items()}
    meta = {"layers": {n: {"pattern": "2:4", "dim": 1, "shape": [m.rows, m.cols]} for n, m in mats.items()},
            "quant": {"version": 2}}
    write_quantized(tmp_path / "q", model, mats, meta)
    back, _, _ = read_packed(tmp_path / "q")
    for name, m in mats.items():
        for part in ("values", "mask", "scales", "levels"):
            assert torch.equal(getattr(m, part), getattr(back[name], part)), part
    loaded = models.load(str(tmp_path / "q"))
    for name, m in mats.items():
        assert torch.equal(loaded.get_submodule(name).weight, m.dense_weight())
    ids = torch.arange(1, 17)
    direct = Engine(model, weights="int4", head="fp32", max_seq=32, threads=1, packed=mats).forward(ids, True)
    stored = Engine(loaded, weights="int4", head="fp32", max_seq=32, threads=1, packed=back).forward(ids, True)
    assert torch.equal(direct, stored) and bool(torch.isfinite(direct).all())


def test_bits_per_weight_of_2_4_int4():
    w = torch.randn(8, 1024)
    w = w * nm_mask(w.abs(), NM(2, 4))
    # values 2 bits, mask 1 bit, one fp16 scale per 32 (4 per 128) kept values
    assert bits_per_weight(pack(w, "int4", NM(2, 4), group_blocks=1)) == pytest.approx(2 + 1 + 16 / 64)
    assert bits_per_weight(pack(w, "int4", NM(2, 4), group_blocks=4)) == pytest.approx(2 + 1 + 16 / 256)


@pytest.mark.parametrize("kind,levels", [("int8", None), ("int4", None), ("int4", tuple(range(-120, 120, 15)))])
def test_stored_values_hold_no_unit_padding_and_unpack_to_the_runtime_layout(kind, levels):
    from nmkit.quant.storage import packed_from_stored

    # 576 inputs at 2:4: 288 kept values a row, which the runtime pads to 320 (5 units of 64)
    w = torch.randn(24, 576, generator=torch.Generator().manual_seed(3))
    w = w * nm_mask(w.abs(), NM(2, 4))
    p = pack(w, kind, NM(2, 4), group_blocks=1)
    if levels is not None:  # the same codes snapped to a table
        table = torch.tensor(levels)
        codes = table[(p.codes().long()[..., None] * 15 - table).abs().argmin(-1)]
        p = from_codes(codes, p.scales, p.kept_mask(), NM(2, 4), 4, 1, levels=levels)
    stored = stored_values(p)
    per_byte = 1 if kind == "int8" else 2
    assert p.values.shape == (24, 320 // per_byte) and stored.shape == (24, 288 // per_byte)
    entry = {"pattern": "2:4", "shape": [24, 576], "kind": kind, "group_blocks": 1, "format": "nm-quantized-rows"}
    parts = {"values": stored, "mask": p.mask, "scales": p.scales, "levels": p.levels}
    back = packed_from_stored(entry, {k: v for k, v in parts.items() if v is not None})
    assert back.values.dtype == p.values.dtype and torch.equal(back.values, p.values)
    assert torch.equal(back.codes(), p.codes()) and torch.equal(back.dense_weight(), p.dense_weight())
    # values 4 or 8 bits a kept weight, 1 mask bit and one fp16 scale per 32 kept values, over 2 weights each
    table_bits = 0 if levels is None else 8 * 16 / (24 * 576)
    assert bits_per_weight(p) == pytest.approx((8 if kind == "int8" else 4) / 2 + 1 + 16 / 64 + table_bits)
    damaged = {**parts, "values": stored[:, :-1]}
    with pytest.raises(UserError, match="damaged"):
        packed_from_stored(entry, {k: v for k, v in damaged.items() if v is not None})


def _as_version_2(directory) -> None:
    """Rewrite a quantized directory the way versions 1-2 stored it: values in the runtime's padded units."""
    mats, _, meta = read_packed(directory)
    tensors = load_file(str(directory / WEIGHTS))
    for name, mat in mats.items():
        tensors[f"{name}.weight_values"] = mat.values
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    side = json.loads((directory / "nmkit.json").read_text())
    side["quant"]["version"] = 2
    for layer in side["layers"].values():
        layer.pop("format", None)
    (directory / "nmkit.json").write_text(json.dumps(side))
    cfg = json.loads((directory / "config.json").read_text())
    for layer in cfg["quantization_config"]["layers"].values():
        layer["format"] = "nm-quantized"
    (directory / "config.json").write_text(json.dumps(cfg))


def test_version_2_directories_read_as_before(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(NM(2, 4))
    mats = {f"model.layers.{i}.mlp.{p}": pack(getattr(layer.mlp, p).weight, "int4", NM(2, 4))
            for i, layer in enumerate(model.model.layers) for p in ("up_proj", "down_proj")}
    meta = {"layers": {n: {"pattern": "2:4", "dim": 1, "shape": [m.rows, m.cols]} for n, m in mats.items()},
            "quant": {"version": 3}}
    new, old = tmp_path / "v3", tmp_path / "v2"
    write_quantized(new, model, mats, meta)
    write_quantized(old, model, mats, meta)
    _as_version_2(old)
    assert (old / WEIGHTS).stat().st_size > (new / WEIGHTS).stat().st_size  # down_proj (192 inputs) was padded
    for directory in (new, old):
        back, _, _ = read_packed(directory)
        assert all(torch.equal(back[n].values, m.values) for n, m in mats.items())
        hf = AutoModelForCausalLM.from_pretrained(directory)
        assert all(torch.equal(hf.get_submodule(n).weight, m.dense_weight()) for n, m in mats.items())


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


def test_quantize_command_fitted_grid_and_refine(pruned_24, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "w4f"
    code = main(["quantize", str(pruned_24), "--quant", "w4", "--quant-grid", "fitted", "--quant-refine", "1",
                 "--quant-act-order", "--quant-epochs", "1", "--calib-samples", "4", "--calib-seqlen", "32",
                 "--data-dir", str(tiny_data_dir), "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["version"], summary["grid"], summary["refine"], summary["act_order"]) == (3, "fitted", 1, True)
    fit = summary["model_fit"]
    assert fit["steps"] == 2 and fit["after"] <= fit["before"] and fit["lr"] == 1e-4
    mats, _, meta = read_packed(out)
    assert meta["quant"]["version"] == 3 and all(m.levels is not None and m.kind == "int4" for m in mats.values())
    assert all(m.pattern == NM(2, 4) for m in mats.values())
    assert bench_main([str(out), "--decode", "2", "--prefill", "4", "--reps", "1", "--json"]) == 0


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
    (["--quant", "w8", "--quant-grid", "fitted"], "--quant-grid fitted needs --quant w4"),
    (["--quant", "w4", "--quant-grid", "nf4"], "unknown --quant-grid 'nf4': choose uniform or fitted"),
    (["--quant", "w4", "--quant-refine", "-1"], "--quant-refine must be in 0..16"),
    (["--quant", "w4", "--quant-epochs", "-1"], "--quant-epochs must be >= 0 and --quant-lr > 0"),
    (["--quant", "w4", "--quant-epochs", "1", "--quant-lr", "0"], "--quant-epochs must be >= 0 and --quant-lr > 0"),
])
def test_bad_quant_input_exits_2_with_one_line_and_writes_nothing(pruned_24, tiny_model_dir, tiny_data_dir, tmp_path,
                                                                  capsys, extra, message):
    for argv in (["quantize", str(pruned_24)], ["prune", str(tiny_model_dir), "--pattern", "2:4"]):
        out = tmp_path / "never"
        code = main([*argv, *extra, "--data-dir", str(tiny_data_dir), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("pattern", [NM(3, 8), NM(1, 16), NM(3, 4)], ids=str)
def test_gptq_refuses_patterns_the_64_value_units_cannot_hold(pattern):
    from nmkit.quant.gptq import quantize_layer

    w = torch.randn(8, 64)
    with pytest.raises(UserError, match="64-value units"):
        quantize_layer(w, torch.eye(64), pattern, QuantSpec(4, 1))
