"""``nmkit plan MODEL --device cpu|FILE --target-speedup X``: a pattern per layer for a device.

Checks every input first (device file, target, output paths), then: the device's cost model (on
``cpu`` a measured profile of this machine, cached; ``--profile`` measures again), the layers'
sensitivities (cached), the least-loss plan that meets the target on each device, and ``plan.json``
for the best device (least predicted loss among those that reach the target).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nmkit import calibration as calibration_set
from nmkit import models, preflight
from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.oneshot.methods import METHODS
from nmkit.patterns import NM, PatternError
from nmkit.plan import devices, planfile, planner, profile, sensitivity
from nmkit.plan.cost import CANDIDATES, DENSE
from nmkit.plan.layers import model_shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in alias (smollm2-135m), local HF directory or HF id")
    p.add_argument("--device", default="cpu", metavar="cpu|FILE",
                   help="cpu (this machine, measured) or a YAML device file listing one or more devices "
                        "(see docs/plan.md); default cpu")
    p.add_argument("--target-speedup", type=float, metavar="X",
                   help="predicted step speedup over dense to reach, e.g. 1.5")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="tokens per step (1: decode; default 1)")
    p.add_argument("--threads", type=int, default=2, metavar="T", help="CPU threads (--device cpu; default 2)")
    p.add_argument("--weights", default="fp32", choices=("fp32", "bf16", "int8", "int4"),
                   help="CPU runtime weight kind (as `nmkit.runtime.bench MODEL@KIND`; default fp32); int8/int4 "
                        "(experimental) time the runtime's integer kernels, while the sensitivities stay those of "
                        "the unquantized weights; their mixed plans ran slower than predicted (docs/plan.md)")
    p.add_argument("--patterns", default=",".join(CANDIDATES),
                   help=f"candidate patterns, N:M keeps N of every M (default {','.join(CANDIDATES)})")
    p.add_argument("--method", default="wanda", help="pruning method the sensitivities use, and the plan "
                   "records for `nmkit prune --plan` (default wanda)")
    calibration_set.add_arguments(p, "the sensitivities")
    p.add_argument("--data-dir", default=None, metavar="D", help="WikiText-2 folder (default $NMKIT_DATA)")
    p.add_argument("--profile", action="store_true",
                   help="measure this CPU again (otherwise a cached profile is used); alone, only profiles")
    p.add_argument("--out", default=None, metavar="plan.json", help="write the plan here")
    p.add_argument("--plot", default=None, metavar="curve.png", help="draw loss vs speedup with the uniform patterns")
    p.add_argument("--json", action="store_true", help="print JSON")


def _log(msg: str) -> None:
    print(f"nmkit: {msg}", file=sys.stderr, flush=True)


def _patterns(spec: str) -> tuple[str, ...]:
    out = []
    for p in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            out.append(DENSE if p == DENSE else str(NM.parse(p)))
        except PatternError:
            raise UserError(f"--patterns: {p!r} is not 'dense' or N:M (keep N of every M, e.g. 2:4)") from None
    if DENSE not in out:
        out.insert(0, DENSE)  # a layer may always stay as it is
    return tuple(dict.fromkeys(out))


def _check(args: argparse.Namespace) -> tuple[list, tuple[str, ...]]:
    if args.device == "cpu":
        devs = [devices.CpuDevice("cpu", args.threads)]
    else:
        devs = devices.load(args.device)
    patterns = _patterns(args.patterns)
    if args.target_speedup is None and not args.profile:
        raise UserError("give --target-speedup X (e.g. 1.5), or --profile to only measure this CPU")
    if args.target_speedup is not None:
        preflight.finite_number("--target-speedup", args.target_speedup, 1.0, low_inclusive=True)
    if args.batch < 1 or args.threads < 1:
        raise UserError("--batch and --threads must be >= 1")
    if args.method not in METHODS or not METHODS[args.method].calibrated:
        calibrated = sorted(m for m, x in METHODS.items() if x.calibrated)
        raise UserError(f"--method must be a calibrated method ({', '.join(calibrated)}), got {args.method!r}")
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            if Path(path).is_dir():
                raise UserError(f"{flag} {path!r} is a directory; give a file path")
            preflight.check_writable(path, flag)
    return devs, patterns


def _cost_model(dev, model, shape, args):
    if not isinstance(dev, devices.CpuDevice):
        return dev
    ident = profile.machine_id(dev.threads, args.batch, args.weights, shape.key)
    prof = None if args.profile else profile.load_cached(ident)
    if prof is None:
        _log(f"profiling this CPU ({dev.threads} threads, batch {args.batch}, {args.weights}); cached for next time")
        prof = profile.measure(model, shape, args.weights, dev.threads, args.batch, log=_log)
        _log(f"profile saved to {profile.save(ident, prof)}")
    return profile.CpuModel(prof, name=dev.name)


def run(args: argparse.Namespace) -> int:
    devs, patterns = _check(args)
    source = models.resolve(args.model)
    preflight.check_model_dir(source.path, tokenizer=True)
    _log(f"loading {source.name}")
    model = models.load(source)
    shape = model_shape(model)
    costs = [_cost_model(d, model, shape, args) for d in devs]
    if args.weights in ("int8", "int4"):
        _log(f"{args.weights} plans are experimental: a mixed one ran slower than predicted (docs/plan.md); "
             f"check yours with benchmarks/plan_speed.py --weights {args.weights}")
    if args.target_speedup is None:  # --profile alone
        return 0
    # reachability needs no sensitivities: refuse an impossible target before the calibration pass
    zero = {n: {p: 0.0 for p in patterns} for n in shape.layers}
    reach = {}
    for c in costs:
        opts = planner.layer_options(c, shape, zero, args.batch, patterns)
        reach[c.name] = planner.evaluate(c, shape, opts, planner.fastest(opts), args.batch).speedup
    if max(reach.values()) < args.target_speedup:
        best = max(reach, key=reach.get)
        raise UserError(f"target {args.target_speedup:g}x is out of reach: the fastest plan on {best} is predicted "
                        f"at {reach[best]:.2f}x; ask for at most that")
    tokenizer = models.load_tokenizer(source)
    samples = calibration_set.from_args(tokenizer, args).samples
    errors = sensitivity.cached(model, samples, args.method, patterns, log=_log)

    results = {}
    for c in costs:
        opts = planner.layer_options(c, shape, errors, args.batch, patterns)
        if reach[c.name] < args.target_speedup:
            results[c.name] = {"reachable": False, "fastest_speedup": reach[c.name]}
            continue
        chosen = planner.plan_for_speedup(c, shape, opts, args.target_speedup, args.batch)
        uniforms = {p: planner.uniform(c, shape, opts, p, args.batch) for p in patterns if p != DENSE}
        results[c.name] = {"reachable": True, "plan": chosen, "options": opts, "cost": c,
                           "uniform": {p: u for p, u in uniforms.items() if u is not None}}
    winner = min((n for n, r in results.items() if r["reachable"]), key=lambda n: results[n]["plan"].loss)
    won = results[winner]
    body = {"model": source.name, "device": winner, "batch": args.batch, "method": args.method,
            "target_speedup": args.target_speedup,
            "calibration": {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.calib_seed,
                            "data": args.calib_data},
            "predicted": {"speedup": won["plan"].speedup, "step_s": won["plan"].step_s,
                          "dense_step_s": won["plan"].dense_step_s, "loss": won["plan"].loss},
            "uniform": {p: {"speedup": u.speedup, "loss": u.loss} for p, u in won["uniform"].items()},
            "devices": {n: ({"reachable": False, "fastest_speedup": r["fastest_speedup"]} if not r["reachable"]
                            else {"reachable": True, "speedup": r["plan"].speedup, "loss": r["plan"].loss})
                        for n, r in results.items()},
            "summary": planner.summary(won["plan"].layers), "layers": won["plan"].layers}
    if args.plot:
        _plot(args.plot, won["cost"], shape, won["options"], args.batch, won["uniform"], won["plan"])
    if args.out:
        planfile.write(args.out, body)
        _log(f"wrote {args.out}")
    print(dumps(body, indent=2) if args.json else _text(body))
    return 0


def _text(body: dict) -> str:
    pred = body["predicted"]
    lines = [f"plan for {body['model']} on {body['device']} (batch {body['batch']}, {body['method']} sensitivities): "
             f"predicted speedup {pred['speedup']:.3f}x (target {body['target_speedup']:g}x), "
             f"predicted loss {pred['loss']:.4f} (sum of layer relative reconstruction errors)"]
    for kind, counts in body["summary"].items():
        lines.append(f"  {kind:<10} " + ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())))
    lines.append("uniform patterns on this device: " + "; ".join(
        f"{p} {u['speedup']:.3f}x loss {u['loss']:.4f}" for p, u in body["uniform"].items()))
    if len(body["devices"]) > 1:
        for name, d in body["devices"].items():
            lines.append(f"  device {name}: " + (f"{d['speedup']:.3f}x, loss {d['loss']:.4f}" if d["reachable"]
                                                 else f"cannot reach the target (fastest {d['fastest_speedup']:.2f}x)"))
    return "\n".join(lines)


def _plot(path: str, cost, shape, options, batch: int, uniforms: dict, chosen) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = planner.curve(cost, shape, options, batch)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.speedup for p in points], [p.loss for p in points], "-o", ms=3, label="plans (predicted)")
    for name, u in uniforms.items():
        ax.plot(u.speedup, u.loss, "s", label=f"uniform {name}")
    ax.plot(chosen.speedup, chosen.loss, "*", ms=12, label="this plan")
    ax.set_xlabel(f"predicted speedup over dense on {cost.name} (batch {batch})")
    ax.set_ylabel("estimated loss (sum of layer errors)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
