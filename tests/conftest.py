"""Shared fixtures: a tiny randomly initialised Llama-style model with its own tokenizer, and a
small WikiText-shaped data directory, both built on the fly (no downloads, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data dir in the WikiText-2 raw layout, filled with Python's bundled pydoc text."""
    root = tmp_path_factory.mktemp("data")
    wt = root / "wikitext-2-raw"
    wt.mkdir()
    lines = [line for line in _corpus().splitlines() if line.strip()]
    (wt / "wiki.train.raw").write_text("\n".join(lines[:3000]) + "\n")
    (wt / "wiki.valid.raw").write_text("\n".join(lines[3000:3300]) + "\n")
    # The test split uses the raw file convention: a blank row is written as " ".
    (wt / "wiki.test.raw").write_text("\n \n".join(lines[3300:4300]) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a 384-token byte-level BPE tokenizer, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_corpus()[:200_000]], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _no_dense_ppl_cache(monkeypatch):
    """Tests measure, never reuse a cached dense perplexity (one test enables it explicitly)."""
    monkeypatch.setenv("NMKIT_NO_PPL_CACHE", "1")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny tokenizer with a chat template, and a 2-layer Llama (hidden 64, the lean runtime's unit)
    whose larger initial weights make greedy text vary from prompt to prompt."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-chat-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
