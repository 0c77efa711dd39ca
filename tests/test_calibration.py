"""The calibration sets: the default mix of offline texts and the single-source WikiText protocol."""

from __future__ import annotations

import pytest
import torch

from nmkit import calibration, data, models
from nmkit.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def test_mix_draws_every_source_by_its_share(tokenizer, tiny_data_dir):
    cal = calibration.build(tokenizer, "mix", 20, 64, seed=3, data_dir=tiny_data_dir)
    assert cal.samples.shape == (20, 64) and cal.samples.dtype == torch.long
    sources = cal.info["sources"]
    assert set(sources) == {"prose", "code", "docs"}  # the tiny tokenizer has no chat template
    assert sum(s["samples"] for s in sources.values()) == 20
    assert sources["prose"]["samples"] == 10 and sources["code"]["samples"] == sources["docs"]["samples"] == 5


def test_mix_is_deterministic_and_the_seed_matters(tokenizer, tiny_data_dir):
    a, b, c = (calibration.build(tokenizer, "mix", 8, 32, seed=s, data_dir=tiny_data_dir) for s in (1, 1, 2))
    assert torch.equal(a.samples, b.samples) and a.info == b.info
    assert not torch.equal(a.samples, c.samples)


def test_wikitext_is_the_old_protocol(tokenizer, tiny_data_dir):
    """``wikitext`` draws exactly the windows the single-source calibration always drew."""
    cal = calibration.build(tokenizer, "wikitext", 6, 32, seed=5, data_dir=tiny_data_dir)
    train = data.load_text("train", tiny_data_dir)
    assert torch.equal(cal.samples, data.calibration_windows(data.tokenize(tokenizer, train), 6, 32, 5))
    assert cal.info == {**train.info, "samples": 6, "seqlen": 32, "seed": 5, "data": "wikitext"}


def test_sources_are_distinct_texts_and_exclude_the_second_text():
    code, docs = calibration.code_text(), calibration.docs_text()
    assert "def " in code and "class " in code
    assert "json.dumps" in docs and "Command-line parsing library" in docs
    second = data.second_text().text
    probe = second[1000:1200]
    assert probe not in code and probe not in docs


def test_chat_turns_use_the_template(tiny_chat_model_dir):
    tok = models.load_tokenizer(str(tiny_chat_model_dir))
    prose = "\n".join(f"paragraph {i} " + "word " * 60 for i in range(4))
    text = calibration.chat_text(tok, prose)
    assert text is not None and "Continue this text:" in text and "paragraph 1" in text
    lines = prose.split("\n")
    turns = [[{"role": "user", "content": f"Continue this text:\n{a.strip()}"},
              {"role": "assistant", "content": b.strip()}] for a, b in (lines[0:2], lines[2:4])]
    assert text == "\n".join(tok.apply_chat_template(t, tokenize=False) for t in turns)


@pytest.mark.parametrize("kind, count, seqlen, match", [
    ("books", 4, 32, "unknown --calib-data"),
    ("mix", 10**6, 512, "calibration text"),
])
def test_bad_requests_are_refused(tokenizer, tiny_data_dir, kind, count, seqlen, match):
    with pytest.raises(UserError, match=match):
        calibration.build(tokenizer, kind, count, seqlen, data_dir=tiny_data_dir)


def test_the_mix_is_the_same_text_in_every_process():
    """A resumed run rebuilds the calibration set in a new process: its text must not depend on the process's
    state (addresses, logging handlers such as pytest's own, tempfile's directory)."""
    import hashlib
    import logging
    import subprocess
    import sys

    probe = ("import hashlib; from nmkit import calibration as c; "
             "print(hashlib.sha256((c.code_text() + c.docs_text()).encode()).hexdigest())")
    logging.getLogger("nmkit-test").addHandler(logging.NullHandler())  # state a plain process does not have
    here = hashlib.sha256((calibration.code_text() + calibration.docs_text()).encode()).hexdigest()
    there = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
