import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nmkit import data
from nmkit.errors import UserError
from nmkit.evaluate import eval_windows, perplexity

SHARED = Path(os.environ.get("NMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAS_WIKITEXT = (SHARED / "wikitext-2-raw" / "wiki.test.raw").is_file()


def test_rows_joined_inverts_raw_layout():
    raw = " = Title = \n \n Body line . \n \n"
    assert data.wikitext_rows_joined(raw) == " = Title = \n" + "\n\n" + "" + "\n\n" + " Body line . \n" + "\n\n" + ""


@pytest.mark.skipif(not HAS_WIKITEXT, reason="WikiText-2 data dir not available")
def test_wikitext_test_split_is_the_published_file():
    text = data.load_text("test", SHARED)
    assert text.sha256 == data.WIKITEXT_TEST_SHA256
    # sha256 of "\n\n".join(HF test rows), the exact string SparseGPT/Wanda evaluate.
    assert hashlib.sha256(text.text.encode()).hexdigest().startswith("696cca6b65a171b0")


def test_data_dir_from_env_and_errors(tmp_path, monkeypatch, tiny_data_dir):
    monkeypatch.setenv("NMKIT_DATA", str(tiny_data_dir))
    assert data.load_text("train").dataset == "wikitext-2-raw"
    with pytest.raises(UserError, match="no WikiText-2 raw files"):
        data.load_text("test", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        data.load_text("test", tmp_path / "nope")
    with pytest.raises(UserError, match="unknown split"):
        data.load_text("dev", tiny_data_dir)


def test_offline_fallback_is_pydoc_with_disjoint_splits(monkeypatch):
    monkeypatch.delenv("NMKIT_DATA", raising=False)
    monkeypatch.setattr(data, "_from_hf_datasets", lambda split: None)
    test, train = data.load_text("test"), data.load_text("train")
    assert test.dataset == "pydoc_data.topics" and test.source == "python-stdlib"
    assert len(test.text) > 10_000 and test.text[:2000] not in train.text


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000)
    a, b = data.calibration_windows(ids, 4, 32, seed=0), data.calibration_windows(ids, 4, 32, seed=0)
    assert a.shape == (4, 32) and torch.equal(a, b)
    assert not torch.equal(a, data.calibration_windows(ids, 4, 32, seed=1))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous windows
    with pytest.raises(UserError):
        data.calibration_windows(torch.arange(10), 1, 32)


def test_eval_windows_protocol():
    ids = torch.arange(100)
    assert eval_windows(ids, 30).shape == (3, 30)
    assert eval_windows(ids, 30, 2).tolist()[1][0] == 30
    assert eval_windows(ids, 30, 99).shape == (3, 30)
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(ids, 200)


def test_perplexity_equals_manual_nll(tiny_model_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = data.load_text("test", tiny_data_dir)
    result = perplexity(model, tok, text, seqlen=64, windows=3, progress=False)
    ids = data.tokenize(tok, text)[: 3 * 64].reshape(3, 64)
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.protocol["windows"] == 3 and result.protocol["tokens"] == 192
    assert result.protocol["sha256"] == text.sha256
