"""Checks that run before any heavy work: inputs readable and well formed, output writable with room.

Each check raises :class:`nmkit.errors.UserError` with one line naming the file, flag or number at
fault and the fix, so a long prune never fails at its end for a reason visible at its start.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

from nmkit.errors import UserError

# What transformers needs to rebuild a tokenizer (any one of them, beside tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
_HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB
def finite_number(flag: str, value: float, low: float | None = None, low_inclusive: bool = False) -> float:
    """``value`` of ``flag`` if it is a finite number above ``low`` (NaN compares false to everything)."""
    if not math.isfinite(value) or (low is not None and not (value >= low if low_inclusive else value > low)):
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low:g}"
        raise UserError(f"{flag} must be a finite number{bound}, got {value}")
    return value


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (catches truncation)."""
    size = path.stat().st_size
    damaged = f"{path} is not a valid safetensors file"
    fix = "re-download or re-save the model"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{damaged} ({size} bytes, too short for a header); {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            raise UserError(f"{damaged} (its header length {length} does not fit the file's {size} bytes); {fix}")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError):
            raise UserError(f"{damaged} (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{damaged} (its header is not a JSON object); {fix}")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{damaged} (its header lacks tensor offsets); {fix}") from None
    if 8 + length + end != size:
        raise UserError(f"{path} is truncated or damaged: its header needs {8 + length + end} bytes, the file has "
                        f"{size}; {fix}")
    return header


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is damaged (not JSON with a weight_map); re-download or re-save the "
                            "model") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise UserError(f"{directory} is incomplete: {missing[0]} (listed in {index.name}) is missing")
        return [directory / s for s in shards]
    return sorted(directory.glob("*.safetensors"))


def check_model_dir(directory: str | Path, tokenizer: bool = True) -> int:
    """Check a local model directory is complete and well formed; returns its weights' bytes at fp32.

    config.json must be JSON, the weights present and not truncated, and (with ``tokenizer``) the
    tokenizer files there. Directories of other kinds (hub ids, GGUF) are left to their loaders.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return 0
    config = directory / "config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise UserError(f"model directory {str(directory)!r} has no config.json; expected a Hugging Face "
                        "model directory") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{config} is not valid JSON ({exc}); restore it from the original model") from None
    if not _weight_files(directory) and any(directory.glob("pytorch_model*.bin")):
        return 0  # the legacy pickle format: transformers checks it
    fp32_bytes = check_weights(directory)
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model directory {str(directory)!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, "
                        "...); copy the tokenizer files from the original model")
    return fp32_bytes


def check_weights(directory: str | Path) -> int:
    """Check the safetensors weights of ``directory`` are all there and whole; returns their bytes at fp32."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory")
    files = _weight_files(directory)
    if not files:
        raise UserError(f"{str(directory)!r} has no weights (model.safetensors or shards); copy them from the "
                        "original model")
    fp32_bytes = 0
    for f in files:
        header = safetensors_header(f)
        fp32_bytes += sum(math.prod(v.get("shape", [])) * 4 for k, v in header.items() if k != "__metadata__")
    return fp32_bytes


def check_writable(out: str | Path, flag: str = "--out") -> Path:
    """Check ``out`` can be created: its nearest existing ancestor is a writable directory."""
    if not str(out).strip():
        raise UserError(f"{flag} is empty; give the path of the output directory")
    out = Path(out).expanduser().absolute()
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {str(out)!r} cannot be created: {parent} is a file, not a directory")
    try:  # os.access ignores read-only mounts for some filesystems; a real probe does not
        probe = tempfile.mkdtemp(prefix=".nmkit-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise UserError(f"{flag} {str(out)!r} is not writable ({parent}: {exc.strerror}); choose another "
                        "location") from None
    return parent


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse when the filesystem of ``directory`` clearly lacks ``needed`` bytes for ``what``."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise UserError(f"not enough disk space in {directory} for {what}: needs about {needed / 2**20:.0f} MiB, "
                        f"{free / 2**20:.0f} MiB free; free space or choose another --out")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_activation_memory(samples: int, seqlen: int, hidden_size: int | None) -> None:
    """Refuse calibration activations that cannot fit in memory: the pipeline holds each block's inputs and
    outputs, ``2 * samples * seqlen * hidden * 4`` bytes."""
    requested = samples * seqlen
    memory = available_memory()
    if hidden_size and memory:
        needed = 2 * requested * hidden_size * 4
        if needed > memory:
            raise UserError(f"--calib-samples {samples} x --calib-seqlen {seqlen} needs about "
                            f"{needed / 2**30:.1f} GiB for activations (hidden size {hidden_size}), "
                            f"{memory / 2**30:.1f} GiB available; lower --calib-samples")


def hidden_size(model_dir: str | Path) -> int | None:
    """``hidden_size`` (or ``d_model``/``n_embd``) from a local model's config.json, if it has one."""
    config = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def torch_device(name: str | None):
    """``--device``: cpu, cuda or cuda:N (default: cuda where torch sees one, else cpu); cuda without a CUDA
    device is one line here, not an error from deep inside the work."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but this torch build sees no CUDA device")
    return torch.device(name)
