"""Recipes: `nmkit.sparsify_(model, config)` and `nmkit prune --recipe` (per-layer patterns by glob)."""

from __future__ import annotations

import json

import pytest
import torch

import nmkit
from nmkit.cli import main
from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.recipe import from_dict


@pytest.mark.parametrize("config, message", [
    ({"patern": "2:4"}, "unknown key 'patern'"),
    ({"pattern": "4:2"}, "not a valid pattern"),
    ({"layers": {"*.mlp.*": "nonsense"}}, "not a valid pattern"),
    ({"method": "nope"}, "unknown method"),
    ({"tail": "maybe"}, "tail must be"),
    ({"calibration": {"samples": 4, "tokens": 9}}, "calibration takes"),
])
def test_bad_recipes_are_rejected(config, message):
    with pytest.raises(UserError, match=message):
        from_dict(config)


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_sparsify_applies_per_layer_patterns(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    ids = torch.randint(0, 300, (2, 32))
    result = nmkit.sparsify_(model, {"pattern": "2:4", "layers": {"*.mlp.down_proj": "1:4", "*.self_attn.*": "4:8"},
                                     "method": "wanda"}, calibration=ids, progress=False)
    got = {x.name: x.pattern for x in result.layers}
    assert len(got) == 14 and result.all_valid
    for name, mod in model.named_modules():
        if name in got:
            want = "1:4" if name.endswith("down_proj") else "4:8" if "self_attn" in name else "2:4"
            assert got[name] == want and NM.parse(want).is_valid(mod.weight != 0), name


def test_sparsify_rejects_a_glob_that_selects_nothing(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"'\*\.mlp\.typo' matches none"):
        nmkit.sparsify_(model, {"layers": {"*.mlp.typo": "2:8"}}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned


@pytest.mark.parametrize("text, message", [
    ("pattern: '2:4'\nmethd: wanda\n", "unknown key 'methd'"),
    ("pattern: '5:4'\n", "not a valid pattern"),
    ("layers:\n  '*.mlp.typo': '2:8'\n", "matches none"),
])
def test_prune_with_a_bad_recipe_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, text, message):
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "out"
    code = main(["prune", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_prune_recipe_is_applied_and_recorded(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("pattern: '2:4'\nlayers:\n  '*.mlp.down_proj': '2:8'\nmethod: magnitude\n"
                                     "exclude: ['*.layers.1.*']\n")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out),
                 "--no-eval", "--json"]) == 0
    meta = json.loads((out / "nmkit.json").read_text())
    assert meta["recipe"]["layers"] == {"*.mlp.down_proj": "2:8"} and meta["method"] == "magnitude"
    assert {n: x["pattern"] for n, x in meta["layers"].items()} == {
        f"model.layers.0.{k}": ("2:8" if k == "mlp.down_proj" else "2:4")
        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
