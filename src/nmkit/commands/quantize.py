"""`nmkit quantize DIR --quant w8|w4 [--quant-group G] --out OUT`: INT8/INT4 kept values for a pruned model.

A calibrated sweep with the N:M mask fixed (GPTQ-style error feedback, :mod:`nmkit.quant.gptq`), run
after pruning, not inside the pruning sweep. ``nmkit prune --quant`` runs the same pass on the model
it just pruned (:func:`quantize_pruned`, :func:`write_output`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nmkit import calibration as calibration_set
from nmkit import data, models, sidecar
from nmkit.errors import UserError
from nmkit.outputs import check_output_dir
from nmkit.patterns import NM
from nmkit.quant.gptq import quantize_model
from nmkit.quant.nm_quant import QuantSpec, check_pattern
from nmkit.quant.storage import FORMAT_VERSION, bits_per_weight, packed_layer, write_quantized
from nmkit.report import machine, now
from nmkit.runtime.pack import PackedMat

QUANT_CHOICES = ("w8", "w4")
GRIDS = ("uniform", "fitted")
_GROUP_BLOCKS = (1, 2, 4, 8, 16)


def add_quant_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--quant / --quant-group, shared with `nmkit prune`."""
    parser.add_argument("--quant", required=required, metavar="w8|w4",
                        help="quantize the kept values to INT8 (w8) or INT4 (w4) with fp16 scales, by a calibrated "
                             "second sweep with the N:M mask fixed (GPTQ-style error feedback)")
    parser.add_argument("--quant-group", type=int, default=None, metavar="G",
                        help="kept values per fp16 scale: a multiple of the kept values per 64 inputs (32 for 2:4) "
                             "spanning 1, 2, 4, 8 or 16 blocks of 64 inputs (default: one block, 32 for 2:4)")
    parser.add_argument("--quant-grid", default="uniform", metavar="uniform|fitted",
                        help="INT4 grid: uniform (codes -8..7) or fitted (a 16-level table per layer, fitted to its "
                             "kept values; the runtime runs it as INT8 codes until its kernels read tables)")
    parser.add_argument("--quant-refine", type=int, default=0, metavar="N",
                        help="after GPTQ, N rounds of least-squares scales and coordinate descent on the codes "
                             "(layer output error; 0 = plain GPTQ) (default 0)")
    parser.add_argument("--quant-act-order", action="store_true",
                        help="GPTQ visits columns by decreasing input energy (scale groups stay contiguous)")
    parser.add_argument("--quant-epochs", type=int, default=0, metavar="E",
                        help="after GPTQ, E epochs over the calibration windows fitting the whole quantized model "
                             "to the unquantized model's logits (codes stay on the grid, masks fixed) (default 0)")
    parser.add_argument("--quant-lr", type=float, default=1e-4, metavar="LR",
                        help="peak learning rate of that fit (default 1e-4)")


def quant_options(args: argparse.Namespace) -> dict:
    """--quant-grid/-refine/-act-order/-epochs/-lr as keyword arguments of quantize_pruned (checked)."""
    if args.quant_grid not in GRIDS:
        raise UserError(f"unknown --quant-grid {args.quant_grid!r}: choose uniform or fitted")
    if args.quant_refine < 0 or args.quant_refine > 16:
        raise UserError(f"--quant-refine must be in 0..16, got {args.quant_refine}")
    if args.quant_grid == "fitted" and args.quant != "w4":
        raise UserError("--quant-grid fitted needs --quant w4 (INT8 keeps its uniform grid)")
    if args.quant_epochs < 0 or not args.quant_lr > 0:
        raise UserError(f"--quant-epochs must be >= 0 and --quant-lr > 0, got {args.quant_epochs} and {args.quant_lr}")
    return {"fit_grid": args.quant_grid == "fitted", "refine": args.quant_refine, "act_order": args.quant_act_order,
            "model_epochs": args.quant_epochs, "model_lr": args.quant_lr}


def parse_spec(quant: str, group: int | None, pattern: NM | None) -> QuantSpec:
    """--quant and --quant-group for layers that follow ``pattern`` (None: dense)."""
    if quant not in QUANT_CHOICES:
        raise UserError(f"unsupported --quant {quant!r}: choose w8 (INT8) or w4 (INT4)")
    k64 = 64 * pattern.keep // pattern.group if pattern else 64
    valid = [k64 * b for b in _GROUP_BLOCKS]
    if group is None:
        group = k64
    if group not in valid:
        raise UserError(f"--quant-group {group} does not fit {pattern or 'dense'} ({k64} kept values per 64 inputs): "
                        f"choose one of {', '.join(map(str, valid))}")
    return QuantSpec(8 if quant == "w8" else 4, group // k64)


def layer_pattern(meta: dict) -> NM:
    """The one N:M every pruned layer of nmkit.json follows (a scale group counts whole 64-input blocks)."""
    found = {layer["pattern"] for layer in (meta.get("layers") or {}).values()}
    if not found:
        raise UserError("nmkit.json names no pruned layers; nothing to quantize")
    if len(found) > 1:
        raise UserError(f"the pruned layers mix patterns ({', '.join(sorted(found))}); quantize needs one N:M")
    try:
        pattern = NM.parse(found.pop())
    except Exception:  # noqa: BLE001 - any non-N:M pattern (50%, transposable...) means the same
        raise UserError("quantized N:M needs plain N:M layers (e.g. 2:4); this model uses another pattern") from None
    check_pattern(pattern)
    return pattern


def quantize_pruned(model, meta: dict, spec: QuantSpec, calibration, calib_info: dict | None,
                    damp: float = 0.01, fit_grid: bool = False, refine: int = 0,
                    act_order: bool = False, model_epochs: int = 0, model_lr: float = 1e-4
                    ) -> tuple[dict[str, PackedMat], dict]:
    """Quantize the pruned layers named in ``meta`` (nmkit.json) in place (dequantized weights written back);
    their packed codes and the quant record (bits per weight and error per layer) for nmkit.json/report."""
    pattern = layer_pattern(meta)
    start = time.perf_counter()
    result = quantize_model(model, calibration, spec, {name: pattern for name in meta["layers"]}, damp=damp,
                            act_order=act_order, refine=refine, fit_grid=fit_grid, model_epochs=model_epochs,
                            model_lr=model_lr)
    mats = {name: packed_layer(layer, model.get_submodule(name).bias) for name, layer in result.layers.items()}
    bpw = {name: bits_per_weight(m) for name, m in mats.items()}
    elements = {name: m.rows * m.cols for name, m in mats.items()}
    record = {"version": FORMAT_VERSION, "bits": spec.bits, "group_blocks": spec.group_blocks,
              "group_kept": spec.group_blocks * 64 * pattern.keep // pattern.group, "method": "gptq-fixed-mask",
              "grid": "fitted" if fit_grid and spec.bits == 4 else "uniform", "refine": refine, "act_order": act_order,
              "damp": damp, "model_fit": result.model_fit and {**result.model_fit, "lr": model_lr},
              "calibration": calib_info, "seconds": round(time.perf_counter() - start, 3),
              "bits_per_weight": sum(bpw[n] * elements[n] for n in bpw) / sum(elements.values())}
    layers = [{"name": n, "bits_per_weight": bpw[n], "rel_error": result.rel_errors[n]} for n in bpw]
    return mats, {**record, "layers": layers}


def write_output(out: str | Path, model, tokenizer, meta: dict, mats: dict[str, PackedMat], quant: dict,
                 report: dict) -> None:
    """The quantized directory with ``report`` (its ``quant`` entry filled in) as report.json."""
    record = {k: v for k, v in quant.items() if k != "layers"}
    body = {**report, "quant": quant, "date": now(), "machine": machine()}
    write_quantized(out, model, mats, {**meta, "quant": record}, tokenizer,
                    extra_files={"report.json": json.dumps(body, indent=2) + "\n"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a pruned model directory (written by `nmkit prune`, with nmkit.json)")
    add_quant_arguments(parser, required=True)
    calibration_set.add_arguments(parser, "the quantization sweep")
    parser.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diagonal")
    parser.add_argument("--data-dir", default=None, metavar="D",
                        help="folder holding wikitext-2-raw (default: $NMKIT_DATA, else HF datasets)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    # Every cheap check before loading the model.
    meta = sidecar.read(args.dir, needed_by="nmkit quantize")
    if meta.get("storage") not in (None, sidecar.STORAGE_DENSE):
        raise UserError(f"{args.dir!r} stores its layers as {meta['storage']!r}; quantize a directory written by "
                        "`nmkit prune` (dense storage)")
    spec = parse_spec(args.quant, args.quant_group, layer_pattern(meta))
    options = quant_options(args)
    if args.calib_samples < 1 or args.calib_seqlen < 2 or not 0 <= args.damp < 10:
        raise UserError("--calib-samples must be >= 1, --calib-seqlen >= 2 and --damp in [0, 10)")
    check_output_dir(args.out, args.overwrite)
    if data.data_dir(args.data_dir) is not None:
        data.check_data_dir(data.data_dir(args.data_dir))

    print(f"nmkit: loading {args.dir}", file=sys.stderr, flush=True)
    model, tokenizer = models.load(args.dir), models.load_tokenizer(args.dir)
    calib = calibration_set.from_args(tokenizer, args)
    calibration, calib_info = calib.samples, calib.info
    mats, summary = quantize_pruned(model, meta, spec, calibration, calib_info, args.damp, **options)
    write_output(args.out, model, tokenizer, meta, mats, summary, {"source": str(args.dir), "model": meta.get("model")})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"quantized {args.dir} -> {args.out}: {spec} (group {summary['group_kept']} kept values), "
              f"{summary['bits_per_weight']:.3f} bits per pruned-layer weight on disk, {summary['seconds']:.0f} s")
    return 0
