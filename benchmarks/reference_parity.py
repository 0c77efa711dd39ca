"""Parity of nmkit's wanda / sparsegpt with the reference implementations, on the same model and data.

Runs the reference pruning functions (``prune_wanda`` / ``prune_sparsegpt`` of the Wanda repository,
whose SparseGPT is the original authors' code) from a checkout you supply, on CPU, with nmkit's
calibration windows (WikiText-2 train, seeded) instead of C4, then evaluates with nmkit's pinned
perplexity protocol and compares masks and weights with an nmkit-pruned directory.

Nothing of the reference is vendored: pass its checkout with ``--reference``
(``git clone https://github.com/locuslab/wanda``). Only thin shims are applied so that the 2023 code
runs on current transformers and a CPU build of torch (rotary embeddings passed to decoder layers,
no-op CUDA calls, a stub for the unused ``datasets`` import).

    NMKIT_DATA=../shared/data python benchmarks/reference_parity.py --reference /path/to/wanda \\
        --method wanda --pattern 2:4 --ours out/r-wanda-2-4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch


def _shim_transformers(model) -> None:
    """The reference calls ``layer(x, attention_mask=, position_ids=)``; current Llama layers also need
    ``position_embeddings``. Compute them from the model's rotary module when missing."""
    layer_cls = type(model.model.layers[0])
    rotary = model.model.rotary_emb
    original = layer_cls.forward

    def forward(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
            position_embeddings = rotary(hidden_states, position_ids)
        return original(self, hidden_states, *args, position_embeddings=position_embeddings,
                        position_ids=position_ids, **kwargs)

    layer_cls.forward = forward


def _import_reference(path: Path):
    sys.modules.setdefault("datasets", types.ModuleType("datasets"))  # only used by its C4 loader
    sys.modules["datasets"].load_dataset = None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    sys.path.insert(0, str(path))
    import lib.prune as reference  # noqa: PLC0415  (from the user's checkout)

    return reference


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, type=Path, help="checkout of github.com/locuslab/wanda")
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--pattern", default="2:4", help="N:M in nmkit's keep-N convention")
    p.add_argument("--ours", type=Path, help="nmkit prune output dir of the same method/pattern, to compare masks")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--no-eval", action="store_true", help="compare masks only, skip the perplexity")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if not (args.reference / "lib" / "prune.py").is_file():
        p.error(f"{args.reference} is not a checkout of locuslab/wanda (lib/prune.py missing)")

    from nmkit import data, evaluate, models
    from nmkit.patterns import NM

    pattern = NM.parse(args.pattern)
    reference = _import_reference(args.reference)
    model = models.load("smollm2-135m").eval()
    tokenizer = models.load_tokenizer("smollm2-135m")
    _shim_transformers(model)
    calib = data.calibration_windows(data.tokenize(tokenizer, data.load_text("train")), args.calib_samples,
                                     args.calib_seqlen, args.seed)
    # The reference's loaders yield (input, target) pairs; it only reads the input.
    reference.get_loaders = lambda *a, **k: ([(row.unsqueeze(0), None) for row in calib], None)
    model.seqlen = args.calib_seqlen
    model.hf_device_map = {}
    ref_args = types.SimpleNamespace(nsamples=args.calib_samples, seed=args.seed, sparsity_ratio=0.5,
                                     use_variant=False)
    prune_n, prune_m = pattern.group - pattern.keep, pattern.group  # the reference counts pruned weights
    start = time.perf_counter()
    with torch.no_grad():
        if args.method == "wanda":
            reference.prune_wanda(ref_args, model, tokenizer, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
        else:
            reference.prune_sparsegpt(ref_args, model, tokenizer, torch.device("cpu"), prune_n=prune_n,
                                      prune_m=prune_m)
    seconds = time.perf_counter() - start
    ppl = None if args.no_eval else evaluate.perplexity(model, tokenizer, data.load_text("test"), args.eval_seqlen,
                                                        args.eval_windows).ppl
    result = {"method": args.method, "pattern": str(pattern), "reference_ppl": ppl, "reference_seconds": seconds}

    if args.ours:
        ours_model = models.load(str(args.ours)).eval()
        ours = dict(ours_model.named_parameters())
        agree = total = 0
        rel, per_block = [], {}
        for name, w in model.named_parameters():
            if w.dim() != 2 or ".layers." not in name:
                continue
            w, o = w.detach(), ours[name].detach()
            same = int(((w != 0) == (o != 0)).sum())
            agree += same
            total += w.numel()
            block = int(name.split(".layers.")[1].split(".")[0])
            a, t = per_block.get(block, (0, 0))
            per_block[block] = (a + same, t + w.numel())
            rel.append(float((w - o).norm() / w.norm()))
        report = json.loads((args.ours / "report.json").read_text()) if (args.ours / "report.json").is_file() else {}
        result |= {"mask_agreement": agree / total, "median_weight_rel_diff": sorted(rel)[len(rel) // 2],
                   "max_weight_rel_diff": max(rel), "ours_ppl": report.get("ppl_sparse"),
                   "mask_agreement_per_block": [round(a / t, 6) for _, (a, t) in sorted(per_block.items())]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
