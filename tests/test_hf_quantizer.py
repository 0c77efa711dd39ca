"""transformers' ``from_pretrained`` on every export: nmkit files build SparseLinear layers through the
registered ``quant_method: "nmkit"`` quantizer; without nmkit they fail instead of loading random weights."""

from __future__ import annotations

import importlib.util
import json
import mmap
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import _assert_same_greedy_tokens, _pruned_dir
from torch import nn

from nmkit.formats.hf_config import INSTALL_HINT
from nmkit.formats.io import export
from nmkit.nn import SparseLinear
from nmkit.patterns import NM
from nmkit.quant import QuantSpec
from nmkit.quant.gptq import round_to_nearest
from nmkit.quant.storage import load_quantized_model, packed_layer, read_packed, write_quantized
from nmkit.solvers.nm import nm_mask

VARIANTS = {"plain": {}, "zstd": {"codec": "zstd"}, "sharded": {"max_shard_bytes": 20_000},
            "zstd-sharded": {"codec": "zstd", "max_shard_bytes": 20_000}}

# Runs a snippet with every `nmkit` import failing, as on a machine where nmkit is not installed.
_BLOCK_NMKIT = """
import sys
class _NoNmkit:
    def find_spec(self, name, path, target=None):
        if name == "nmkit" or name.startswith("nmkit."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoNmkit())
"""


def _run_without_nmkit(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_NMKIT + code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def _whole_pages(directory: Path, names: set[str]) -> int:
    """Bytes of the whole memory pages inside the named tensors of the directory's safetensors files
    (a file is mapped from offset 0, so a tensor's address modulo the page size is its file offset's)."""
    page, total = mmap.PAGESIZE, 0
    for f in directory.glob("*.safetensors"):
        raw = f.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        for name, entry in json.loads(raw[8:8 + size]).items():
            if name in names:
                begin, end = (8 + size + o for o in entry["data_offsets"])
                total += max(0, end // page - -(-begin // page)) * page
    return total


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_builds_sparse_layers(tmp_path, variant, dtype):
    from transformers import AutoModelForCausalLM

    src, model = _pruned_dir(tmp_path, dtype=dtype)
    export(src, "nmkit", tmp_path / "nm", **VARIANTS[variant])
    cfg = json.loads((tmp_path / "nm" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "nmkit" and cfg["layers"]["model.layers.0.mlp.up_proj"]["pattern"] == "2:4"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nm", dtype="auto")
    assert loaded.dtype == dtype
    pruned = cfg["layers"]
    for name, mod in loaded.named_modules():
        if name in pruned:
            assert isinstance(mod, SparseLinear) and mod.values.dtype == dtype, name
        assert not (type(mod) is nn.Linear and name in pruned)
    # Straight from the file: no pruned layer holds a dense weight, and the file pages of the stored
    # tensors were given back once regrouped: every whole page inside them (coded files: some).
    assert all(mod.dense_weight is None for mod in loaded.modules() if isinstance(mod, SparseLinear))
    released = loaded.hf_quantizer._release.released
    stored = {f"{name}.weight_{part}" for name in pruned for part in ("values", "mask")}
    assert released == _whole_pages(tmp_path / "nm", stored) if "codec" not in VARIANTS[variant] else released > 0
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    _assert_same_greedy_tokens(model, loaded)


def test_from_pretrained_equals_nmkit_load_with_biased_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    import nmkit

    src, model = _pruned_dir(tmp_path, bias=True)
    export(src, "nmkit", tmp_path / "nm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nm")
    direct = nmkit.load(str(tmp_path / "nm"))
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    got, want = loaded.state_dict(), direct.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)


def test_other_exports_load_or_fail_loudly(tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = _pruned_dir(tmp_path)
    export(src, "nmkit", tmp_path / "nm")
    export(tmp_path / "nm", "dense", tmp_path / "dense")  # from a compressed source: the nmkit block goes
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    _assert_same_greedy_tokens(model, AutoModelForCausalLM.from_pretrained(tmp_path / "dense"))
    export(src, "compressed-tensors-24", tmp_path / "ct")
    ct_cfg = json.loads((tmp_path / "ct" / "config.json").read_text())  # fields transformers 4.x reads
    assert ct_cfg["rope_theta"] == ct_cfg["rope_parameters"]["rope_theta"] and ct_cfg["torch_dtype"] == "float32"
    if importlib.util.find_spec("compressed_tensors") is None:  # decoded only by the older stack (docs/exports.md)
        with pytest.raises(ImportError, match="compressed-tensors"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


def _quantized_dir(tmp_path, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny Llama with biased attention, written by ``write_quantized``: attention and gate/up 2:4
    quantized, down_proj quantized dense (no mask), the rest as is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attention_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    mats, layers = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            pattern = None if name.endswith("down_proj") else NM(2, 4)
            w = mod.weight.detach().float()
            w = w if pattern is None else w * nm_mask(w.abs(), pattern)
            mats[name] = packed_layer(round_to_nearest(w, pattern, spec), mod.bias)
            layers[name] = {"pattern": str(pattern) if pattern else "dense", "dim": 1, "shape": list(w.shape)}
    out = tmp_path / "quantized"
    write_quantized(out, model, mats, {"layers": layers, "quant": {"version": 1, "bits": spec.bits}})
    return out


FITTED_LEVELS = (-100, -70, -50, -36, -25, -16, -8, -2, 3, 9, 17, 26, 38, 52, 72, 110)  # an INT4 level table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec(8, 1), QuantSpec(4, 2), QuantSpec(4, 1, FITTED_LEVELS)],
                         ids=["int8", "int4-g2", "int4-levels"])
def test_from_pretrained_reads_quantized_dirs_as_nmkit_load(tmp_path, spec, dtype):
    from transformers import AutoModelForCausalLM

    out = _quantized_dir(tmp_path, spec, dtype)
    mats, _, _ = read_packed(out)
    assert {m.kind for m in mats.values()} == {f"int{spec.bits}"} and any(m.mask is None for m in mats.values())
    assert all((m.levels is not None) == (spec.levels is not None) for m in mats.values())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {layer["format"] for layer in cfg["layers"].values()} == {"nm-quantized-rows"}
    card = (out / "README.md").read_text()  # the model card says what loads it
    assert "- nmkit-quantized" in card and "pip install nmkit" in card and "from_pretrained" in card
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    reference = load_quantized_model(out, dtype=dtype)
    assert loaded.dtype == dtype
    for name, mat in mats.items():  # the stored codes times the fp16 scales, rounded once to the model's dtype
        assert torch.equal(loaded.get_submodule(name).weight, mat.dense_weight().to(dtype)), name
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and INSTALL_HINT not in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("variant", [*VARIANTS, "quantized"])
def test_without_nmkit_from_pretrained_fails_naming_nmkit(tmp_path, variant):
    if variant == "quantized":
        out = _quantized_dir(tmp_path, QuantSpec(4, 1))
    else:
        src, _ = _pruned_dir(tmp_path)
        out = tmp_path / "nm"
        export(src, "nmkit", out, **VARIANTS[variant])
    result = _run_without_nmkit(f"""
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(out)!r})
print("LOADED")
""")
    assert result.returncode != 0 and "LOADED" not in result.stdout
    assert "ignore_mismatched_sizes" in result.stderr  # an error, not a warning: the guards do not fit
    assert "got nmkit" in result.stderr  # transformers names the unknown quant_method
    assert INSTALL_HINT in result.stderr  # its load report lists the key that says what to install


@pytest.mark.parametrize("order", ["nmkit-first", "transformers-first"])
def test_import_nmkit_stays_light_and_registers(order):
    code = """
import sys
import nmkit
assert "transformers" not in sys.modules
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
""" if order == "nmkit-first" else """
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
import nmkit
"""
    code += """
assert AUTO_QUANTIZER_MAPPING["nmkit"].__name__ == "NmkitHfQuantizer"
print("OK")
"""
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.strip() == "OK", result.stderr
