"""`nmkit export DIR --format {dense,nmkit,compressed-tensors-24} [--codec zstd] --out OUT`."""

from __future__ import annotations

import argparse
import sys

from nmkit import preflight
from nmkit.errors import UserError
from nmkit.formats.codec import CODECS
from nmkit.formats.io import FORMATS, export
from nmkit.jsonout import dumps
from nmkit.outputs import remove_stale, write_failure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a pruned model directory (written by `nmkit prune`, with nmkit.json)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="dense: zeros in place + nmkit.json (loads anywhere transformers does); "
                             "nmkit: compressed values + bitmask (nmkit.load returns SparseLinear layers); "
                             "compressed-tensors-24: legacy sparse-24-bitmask for older vLLM (2:4 only)")
    parser.add_argument("--codec", choices=CODECS, default="none",
                        help="nmkit format only: zstd entropy-codes every tensor losslessly (byte planes; "
                             "~0.66x the uncoded nmkit file for bf16, decoded on load); default none")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-shard-size", default="4GiB",
                        help="largest safetensors file before the output is sharded (HF style, with an index); "
                             "export memory stays near this size. Default 4GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _log(msg: str) -> None:
    print(f"nmkit: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    for path in remove_stale(args.out):
        _log(f"removed {path}, left by an interrupted export")
    out = Path(args.out)
    parent = preflight.check_writable(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
    preflight.check_weights(args.dir)
    # roughly the source's size: compressed formats need less, a dense export of a compressed source more
    preflight.check_free_space(parent, sum(f.stat().st_size for f in Path(args.dir).glob("*.safetensors")),
                               "the export")
    try:
        summary = export(args.dir, args.format, out, codec=args.codec, max_shard_bytes=args.max_shard_size)
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise UserError(f"cannot write {args.out}: {failure}; free space (or fix the path) and rerun") from None
    if args.json:
        print(dumps(summary))
    else:
        line = f"exported {args.dir} -> {out} ({summary['format']}, {summary['bytes'] / 2**20:.1f} MiB"
        if "ratio" in summary:
            line += f", {summary['ratio']:.3f}x the dense tensors"
        if summary.get("files", 1) > 1:
            line += f", {summary['files']} shards"
        if summary.get("codec", "none") != "none":
            line += f", codec {summary['codec']}"
        print(line + ")")
    return 0
