"""One FFN training step (forward and backward) on sparse operands against the dense step, on CPU.

    python benchmarks/ffn_train_speed.py [--shapes 576x1536 4096x11008] [--tokens 2048] \
        [--patterns 256:2:8 2048:2:8 256:2:16] [--dtype fp32] [--threads 2] [--rounds 5]

A Llama-style gated FFN, ``down(silu(gate(x)) * up(x))``, hidden d x intermediate i (``DxI``), with T
tokens. ``dense`` is plain autograd over ``F.linear``. Each sparse row keeps the weights 2:4 (a fixed
magnitude mask, applied to the gathered columns by ``vnm_linear``) and prunes the inputs of both products
(x into gate/up, the hidden state into down) to the V:N:M pattern, through
``nmkit.training.sparse_ffn.vnm_linear``. Rounds alternate the contenders; prints median seconds
per step and the ratio dense / sparse (above 1: the sparse step is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nmkit.training.masks import magnitude_mask
from nmkit.training.sparse_ffn import vnm_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _dense_step(x, gate_up, down) -> None:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    y = F.linear(F.silu(gate) * up, down)
    y.backward(torch.ones_like(y))


def _sparse_step(x, gate_up, down, masks, pattern: str) -> None:
    gate, up = vnm_linear(x, gate_up, None, pattern, masks[0]).chunk(2, dim=-1)
    y = vnm_linear(F.silu(gate) * up, down, None, pattern, masks[1])
    y.backward(torch.ones_like(y))


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def bench(d: int, i: int, tokens: int, patterns: list[str], dtype: torch.dtype, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=gen).to(dtype)
    gate_up = (torch.randn(2 * i, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
    down = (torch.randn(d, i, generator=gen) / i**0.5).to(dtype).requires_grad_()
    masks = [magnitude_mask(gate_up.detach(), "2:4"), magnitude_mask(down.detach(), "2:4")]
    steps = {"dense": lambda: _dense_step(x, gate_up, down)}
    for p in patterns:
        steps[p] = lambda p=p: _sparse_step(x, gate_up, down, masks, p)
    for step in steps.values():  # warm-up (allocator, BLAS packing)
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            gate_up.grad = down.grad = None
            times[key].append(_time(step))
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = [f"dense {med['dense'] * 1e3:.1f} ms"] + [
        f"{p} {med[p] * 1e3:.1f} ms ({med['dense'] / med[p]:.2f}x)" for p in patterns]
    print(f"{d}x{i} T={tokens} {str(dtype).removeprefix('torch.')}: " + ", ".join(parts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["576x1536", "4096x11008"], help="hidden x intermediate")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--patterns", nargs="+", default=["256:2:8", "2048:2:8", "256:2:16"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shapes:
        d, i = (int(s) for s in shape.split("x"))
        bench(d, i, args.tokens, args.patterns, DTYPES[args.dtype], args.rounds)


if __name__ == "__main__":
    main()
