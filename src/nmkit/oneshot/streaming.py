"""Prune a Hugging Face safetensors directory one block at a time, never holding the whole model.

The model is built on the ``meta`` device (no memory); the parts outside the transformer blocks
(embeddings, final norm, LM head, rotary tables) are loaded for the calibration capture, and then
each block in turn is read from the memory-mapped shards, pruned with the same per-block step as
:func:`nmkit.oneshot.sequential.prune_sequential`, written to the checkpoint and dropped back to
``meta``. Peak memory is therefore about

    one block's weights (fp32) + the calibration activations (2 x samples x seqlen x hidden x 4 bytes)
    + one distinct input's X^T X (in x in x 4 bytes, 3 of them for a Llama block) + the solver's copies
    of one layer + the parts outside the blocks + the fixed runtime,

independent of depth (docs/distributed.md gives the figures). The checkpoint's block files are the
pruned shards: :func:`write_streamed_model` hard-links them into the output directory, so a finished
run writes each block once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from nmkit import faults
from nmkit.errors import UserError
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.distributed import Ranks
from nmkit.oneshot.methods import METHODS
from nmkit.oneshot.results import LayerResult, PruneResult
from nmkit.oneshot.sequential import (
    _Checkpoint,
    _group_by_block,
    _out_in,
    check_distributable,
    prune_block,
    solve_shared,
)
from nmkit.oneshot.targets import find_targets
from nmkit.patterns import Pattern, PatternError, TailPolicy, check_tail, parse

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def _header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file, and its parsed form."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
    return raw, json.loads(raw)


class SafetensorsDir:
    """The tensors of an HF safetensors directory (one file or an index of shards), read on demand."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if (self.dir / INDEX).is_file():
            self.where: dict[str, str] = json.loads((self.dir / INDEX).read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            self.where = dict.fromkeys(_header(self.dir / SINGLE)[1].keys() - {"__metadata__"}, SINGLE)
        else:
            raise UserError(f"{self.dir} has neither {SINGLE} nor {INDEX}: streaming reads safetensors checkpoints "
                            "(re-save the model with save_pretrained, or prune without --stream)")
        files = sorted(set(self.where.values()))
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise UserError(f"shard {missing[0]} listed in {self.dir / INDEX} is missing ({len(missing)} of "
                            f"{len(files)} shards absent); download the complete checkpoint and rerun")
        for f in files:  # a truncated shard is refused now, not blocks into the run
            try:
                raw, header = _header(self.dir / f)
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                raise UserError(f"shard {self.dir / f} is not a readable safetensors file; download it again") from None
            if (self.dir / f).stat().st_size < 8 + len(raw) + end:
                raise UserError(f"shard {self.dir / f} is truncated ({(self.dir / f).stat().st_size} bytes, its "
                                f"header needs {8 + len(raw) + end}); download it again")

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(self.dir / f, framework="pt") as fh:  # memory-mapped: reads only these tensors
                out.update({n: fh.get_tensor(n) for n in group})
        return out

    def identity(self) -> str:
        """SHA-256 over each shard's name, size and header (names, dtypes, shapes, offsets): which
        checkpoint a resume belongs to, without reading every byte of a model larger than memory."""
        h = hashlib.sha256()
        for f in sorted(set(self.where.values())):
            h.update(f"{f}|{(self.dir / f).stat().st_size}|".encode())
            h.update(_header(self.dir / f)[0])
        return h.hexdigest()


def skeleton(directory: str | Path, store: SafetensorsDir,
             device: torch.device) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model with its blocks on ``meta`` and everything else loaded on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prefix, blocks = find_blocks(model)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    present = [k for k in outside if k in store.where]
    model.load_state_dict({k: v.to(device, torch.float32) for k, v in store.tensors(present).items()},
                          strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in model.named_modules():  # buffers computed at init (rotary tables): build them again
        if name.startswith(prefix + ".") or name == prefix:
            continue
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            try:
                with torch.device(device):
                    fresh = type(module)(config=model.config)
            except TypeError:
                raise UserError(f"streaming cannot rebuild {name} ({type(module).__name__}) of this architecture; "
                                "prune without --stream") from None
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
            if p.is_meta and not n.startswith(prefix + ".")]
    if left:
        raise UserError(f"{directory} lacks {left[0]} (and {len(left) - 1} more tensors outside the blocks); "
                        "download the complete checkpoint")
    return model, prefix, blocks


def _load_block(block: nn.Module, key: str, store: SafetensorsDir, device: torch.device) -> None:
    names = [key + k for k in block.state_dict()]
    missing = [n for n in names if n not in store.where]
    if missing:
        raise UserError(f"{store.dir} lacks {missing[0]}; download the complete checkpoint")
    tensors = store.tensors(names)
    block.load_state_dict({n[len(key):]: t.to(device, torch.float32) for n, t in tensors.items()}, assign=True)


@torch.no_grad()
def prune_streaming(
    directory: str | Path,
    pattern: Pattern | str,
    method: str,
    samples: torch.Tensor | None,
    checkpoint_dir: str | Path,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    tail: TailPolicy = "error",
    options: dict | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    progress: bool = True,
    batch: int = 8,
    ranks: Ranks | None = None,
    device: torch.device | str = "cpu",
) -> tuple[PruneResult, list[str], dict[str, int]]:
    """Prune the safetensors checkpoint in ``directory`` block by block into ``checkpoint_dir``.

    Returns the result, the names of the non-block tensors (which :func:`write_streamed_model` copies
    from ``directory``) and each target's input dimension; the pruned blocks are the checkpoint's
    ``block-NNNN.safetensors`` files. ``samples`` (K, L) token ids for calibrated methods, None for
    magnitude. The checkpoint is kept (the caller removes it once the output is in place).
    """
    pattern, device, ranks = parse(pattern), torch.device(device), ranks or Ranks()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    calibrated = METHODS[method].calibrated
    if calibrated and samples is None:
        raise UserError(f"method {method!r} needs calibration data (token ids, shape (samples, seqlen))")
    options = options or {}
    store = SafetensorsDir(directory)
    model, prefix, blocks = skeleton(directory, store, device)
    targets = find_targets(model, include, exclude)
    for t in targets:
        group = getattr(pattern, "group", None)
        try:
            if group:
                check_tail(_out_in(t).shape[1], group, tail)
        except PatternError as exc:
            raise UserError(f"layer {t.name} {list(t.weight.shape)}: {exc}") from None
    per_block = _group_by_block(targets, prefix, len(blocks))
    fake = samples if samples is not None else torch.zeros(ranks.size, 1, dtype=torch.long)
    check_distributable(ranks, per_block, fake, method, False, pattern)

    config = {"pattern": str(pattern), "method": method, "options": options, "include": include,
              "exclude": exclude, "tail": tail, "streamed": True, "threads": torch.get_num_threads(),
              "weights": store.identity(), **(run_config or {})}
    if samples is not None:
        config |= {"samples": list(samples.shape), "samples_sum": int(samples.long().sum())}
        samples = ranks.samples(samples)
    if ranks.size > 1:
        config["ranks"] = ranks.size
    ckpt = _Checkpoint(Path(checkpoint_dir), config, ranks)
    if not resume:
        ckpt.remove()
    state = ckpt.load() if resume else None
    result = PruneResult(str(pattern), method)
    start = time.perf_counter()
    hidden = kwargs = None
    if state is not None:
        first, prior_seconds = state["next_block"], state["seconds"]
        result.layers = [LayerResult(**x) for x in state["layers"]]
        if calibrated:
            hidden = ckpt.load_streams(state)["hidden"].to(device)
            _, kwargs = capture_block_inputs(model, blocks[0], samples[:1], device)
    else:
        first, prior_seconds = 0, 0.0
        if calibrated:
            hidden, kwargs = capture_block_inputs(model, blocks[0], samples, device)

    bar = tqdm(range(len(blocks)), desc=f"prune {pattern} ({method}, streamed)", unit="block",
               disable=not progress or not ranks.leader, initial=first)
    try:
        for i in range(first, len(blocks)):
            block, block_targets = blocks[i], per_block[i]
            key = f"{prefix}.{i}."
            _load_block(block, key, store, device)
            for t in block_targets:
                bad = int((~torch.isfinite(t.weight)).sum())
                if bad:
                    raise UserError(f"layer {t.name} has {bad} non-finite weights (NaN or Inf): the model is damaged "
                                    "or diverged; fix or re-download the weights (or --exclude the layer)")
            if block_targets and calibrated:
                layers, _ = prune_block(block, block_targets, hidden, kwargs, pattern, method, tail, options, batch,
                                        ranks, i)
                result.layers += layers
            elif block_targets:  # data-free: no statistics, the same plan across the ranks
                result.layers += solve_shared(block_targets, None, pattern, method, tail, options, ranks, i)
            if calibrated:
                hidden = run_block(block, hidden, kwargs, batch)
            weights = {key + k: v.detach().cpu() for k, v in block.state_dict().items()}
            ckpt.save(i, weights, {"hidden": hidden.cpu()} if calibrated else {},
                      {"next_block": i + 1, "layers": [asdict(x) for x in result.layers],
                       "seconds": prior_seconds + time.perf_counter() - start})
            faults.point(f"after-commit-{i}")
            del weights
            block.to("meta")  # this block's memory goes back before the next one is read
            release_freed_memory()
            bar.update(1)
    finally:
        bar.close()
    result.seconds = prior_seconds + time.perf_counter() - start
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".") and k in store.where]
    return result, outside, {t.name: t.reduce_dim for t in targets}


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Without it the
    allocator keeps what each block's tensors left behind, fragmented, and the process grows with depth."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def write_streamed_model(tmp: Path, directory: str | Path, checkpoint_dir: str | Path, outside: list[str]) -> None:
    """Assemble the pruned checkpoint in ``tmp``: the untouched tensors outside the blocks, the checkpoint's
    block files (hard-linked: no second copy), the shard index, config and tokenizer files."""
    directory, ckpt = Path(directory), Path(checkpoint_dir)
    block_files = sorted(ckpt.glob("block-*.safetensors"))
    total = len(block_files) + 1
    name = f"model-00001-of-{total:05d}.safetensors"
    tensors = SafetensorsDir(directory).tensors(outside)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / name, metadata={"format": "pt"})
    weight_map = dict.fromkeys(tensors, name)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    for k, src in enumerate(block_files, start=2):
        name = f"model-{k:05d}-of-{total:05d}.safetensors"
        try:
            os.link(src, tmp / name)
        except OSError:  # another filesystem: copy
            shutil.copyfile(src, tmp / name)
        with safe_open(tmp / name, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                weight_map[key] = name
                sl = fh.get_slice(key)
                size += torch.Size(sl.get_shape()).numel() * 4
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    config = json.loads((directory / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # the blocks were pruned (and are stored) in float32
        if key in config:
            config[key] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (directory / f).is_file():
            shutil.copyfile(directory / f, tmp / f)
