"""Model cards: the README.md (Hugging Face Hub front matter + text) in every directory nmkit writes.

The card is rendered from what the directory itself holds (``nmkit.json``, ``report.json``,
``finetune.json``, the files of an export), so ``prune``, ``finetune`` and ``export`` each call
:func:`write` last and the card never disagrees with the files beside it. The base model is named by
:func:`nmkit.models.base_info` (name, source, sha256 of its weights, licence); no local path goes into a card.
"""

from __future__ import annotations

import json
from pathlib import Path

from nmkit import sidecar
from nmkit.calibration import describe as describe_calibration

CARD = "README.md"



# How an nmkit-stored directory loads through transformers (compressed and quantized storage alike).
_LOAD_WITH_NMKIT = ["```python", "import nmkit  # registers quant_method 'nmkit' with transformers",
                    "from transformers import AutoModelForCausalLM", "",
                    'model = AutoModelForCausalLM.from_pretrained("path/or/hub-id", dtype="auto")',
                    "# or: model = nmkit.load(\"path\")", "```", "",
                    "Without nmkit, transformers stops with a size-mismatch error (it never loads these files as "
                    "random weights): `pip install nmkit`."]

def _front_matter(base: dict, meta: dict, pipeline: str | None) -> str:
    pattern = meta.get("pattern") or next(iter(meta.get("layers", {}).values()), {}).get("pattern")
    tags = ["nmkit", "sparse", "n:m-sparsity", "pruned"]
    if pattern:
        tags.append(f"{pattern.replace(':', '-')}-sparsity")
    if meta.get("storage") in ("nmkit-compressed", "nmkit-quantized"):
        tags.append(meta["storage"])
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base.get("name") and "/" in base["name"]:  # the Hub links base_model only to Hub ids
        lines.append(f"base_model: {base['name']}")
    if base.get("license"):
        lines.append(f"license: {base['license']}")
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    return "\n".join(lines + ["---", ""])


def _load_section(directory: Path, meta: dict) -> list[str]:
    storage = meta.get("storage")
    if storage == "nmkit-compressed":
        return ["## How to load", "",
                "The pruned layers are stored compressed (kept values + 1-bit mask). With nmkit installed and "
                "imported, transformers builds them as nmkit `SparseLinear` layers straight from the file:", "",
                *_LOAD_WITH_NMKIT]
    if storage == "nmkit-quantized":
        quant = meta.get("quant") or {}
        return ["## How to load", "",
                f"The pruned layers are stored quantized (INT{quant.get('bits', '?')} kept values with fp16 group "
                "scales, 1-bit mask). With nmkit installed and imported, transformers loads them dequantized "
                "(the same weights as `nmkit.load`); `nmkit generate DIR` runs the stored codes:", "",
                *_LOAD_WITH_NMKIT]
    if storage == "compressed-tensors-24":
        return ["## How to load", "",
                "Stored as compressed-tensors `sparse-24-bitmask`, which only compressed-tensors 0.14.0.1 with "
                "transformers 4.57 decodes (see nmkit's docs/exports.md). `nmkit export --format dense` writes a "
                "copy that loads anywhere."]
    return ["## How to load", "",
            "Zeros in place, plain safetensors: any transformers loads it.", "",
            "```python", "from transformers import AutoModelForCausalLM", "",
            'model = AutoModelForCausalLM.from_pretrained("path/or/hub-id", dtype="auto")', "",
            "import nmkit  # optional: N:M kernels where they are faster on this machine",
            "nmkit.compress(model)", "```", "",
            "`nmkit export DIR --format nmkit --out OUT` writes the compressed form "
            f"({'about 0.65x' if meta.get('pattern') == '2:4' else 'smaller than'} the dense file for 2:4 bf16)."]


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render(directory: str | Path) -> str:
    """The card text for a directory nmkit wrote (it must hold ``nmkit.json``)."""
    directory = Path(directory)
    meta = sidecar.read(directory)
    report = json.loads((directory / "report.json").read_text()) if (directory / "report.json").is_file() else {}
    finetune = meta.get("finetune")
    base = meta.get("base") or report.get("base") or {}
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    archs = config.get("architectures") or []
    pipeline = "text-generation" if any(a.endswith("ForCausalLM") for a in archs) else None
    layers = meta.get("layers", {})
    pattern = meta.get("pattern") or next(iter(layers.values()), {}).get("pattern", "?")
    title = f"{base.get('name', meta.get('model', 'model'))}, {pattern} sparse (nmkit)"
    lines = [_front_matter(base, meta, pipeline), f"# {title}", "",
             f"N:M sparse version of `{base.get('name', '?')}` made with [nmkit](https://pypi.org/project/nmkit/). "
             f"N:M means keep N of every M consecutive weights along the input dimension: {pattern} in "
             f"{len(layers)} linear layers.", "",
             "## Base model", "",
             f"- name: `{base.get('name', 'unknown')}`", f"- source: {base.get('source', 'unknown')}",
             f"- sha256 of its weights: `{base.get('sha256') or 'unknown'}`",
             f"- licence: {base.get('license') or 'unknown (check the base model)'}", "",
             "## Method", "",
             f"- pruning: `{meta.get('method', '?')}` to {pattern}" +
             (f", tail policy `{meta['tail']}`" if meta.get("tail") else ""),
             ]
    if meta.get("quant"):
        q = meta["quant"]
        lines.append(f"- quantization: INT{q.get('bits')} kept values, {q.get('method', '?')}, "
                     f"{q.get('group_kept', '?')} kept values per fp16 scale")
    if meta.get("recipe"):
        lines.append(f"- recipe: `{json.dumps(meta['recipe'], sort_keys=True)}`")
    cal = meta.get("calibration") or report.get("calibration")
    if cal:
        lines.append(f"- calibration: {describe_calibration(cal)}")
    else:
        lines.append("- calibration: none (the method needs none)")
    if finetune:
        lines.append(f"- recovery fine-tune: {finetune.get('steps_done')} steps, lr {finetune.get('lr')}, "
                     f"distill={finetune.get('distill')}, LoRA rank {finetune.get('lora_rank')}; mask kept fixed")
    ev = (finetune or {}).get("eval") or meta.get("eval") or report.get("eval")
    lines += ["", "## Evaluation", ""]
    if ev and "windows" in ev:
        lines.append(f"Perplexity on {ev.get('dataset')} {ev.get('split')} ({ev.get('source')}"
                     + (f", sha256 {ev['sha256'][:12]}..." if ev.get("sha256") else "")
                     + f"), {ev.get('windows')} windows x {ev.get('seqlen')} tokens:")
        lines += ["", "| model | perplexity |", "|---|---|",
                  f"| dense base | {_fmt(report.get('ppl_dense') or (finetune or {}).get('ppl_dense'))} |",
                  f"| pruned | {_fmt(report.get('ppl_sparse') or (finetune or {}).get('ppl_before'))} |"]
        if finetune:
            lines.append(f"| pruned + fine-tuned | {_fmt(finetune.get('ppl_after'))} |")
        lines.append("")
        lines.append("Reproduce with `nmkit eval DIR` (same protocol by default).")
    elif report.get("embedding_cosine_mean") is not None:
        lines.append(f"Sentence-embedding cosine to the dense model: mean {_fmt(report['embedding_cosine_mean'], 4)}, "
                     f"min {_fmt(report.get('embedding_cosine_min'), 4)}.")
    else:
        lines.append("Not evaluated (run `nmkit eval DIR`).")
    lines += ["", *_load_section(directory, meta), ""]
    versions = meta.get("versions") or {}
    if versions:
        lines.append("Written by " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    return "\n".join(lines) + "\n"


def write(directory: str | Path) -> Path:
    """Render and write the directory's README.md (replacing a copied one)."""
    path = Path(directory) / CARD
    path.write_text(render(directory))
    return path


__all__ = ["CARD", "render", "write"]
