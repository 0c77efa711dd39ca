"""Write a random-weight Llama-style Hugging Face checkpoint of about a requested parameter count.

    python benchmarks/synthetic_llama.py --params 1.2e9 --out /tmp/distrib/llama-1b

Sharded safetensors (``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``),
``config.json`` and the embedded SmolLM2's tokenizer (so ``nmkit prune`` can tokenize calibration
text: the vocabulary is SmolLM2's 49152 tokens). Tensors are generated one at a time, seeded by name,
and flushed shard by shard: memory stays near one shard, whatever the model's size. Streaming and
distributed pruning (docs/distributed.md) are measured on these without downloading anything.

Shape: hidden size from the parameter count (a Llama-like width for the size), MLP 8/3 x hidden
rounded to 256, grouped-query attention with 4 query heads per KV head, untied LM head (as Llama 3),
and as many blocks as the budget allows. The weights are N(0, 0.02) (norms 1), so activations stay
finite through the blocks; perplexity is meaningless, pruning cost and memory are realistic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 49152  # SmolLM2's tokenizer, copied into the checkpoint
WIDTHS = (512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192)  # hidden sizes to choose from


def shape_for(params: float, hidden: int | None = None, layers: int | None = None) -> dict:
    """A Llama config dict of about ``params`` parameters (``hidden`` / ``layers`` override the choice)."""
    if hidden is None:  # Llama-like aspect ratio: about 16 x hidden^2 x ~(hidden/128) parameters in blocks
        hidden = min(WIDTHS, key=lambda h: abs(per_block(h) * max(1, h // 128) + 2 * VOCAB * h - params))
    head_dim = 64 if hidden <= 2048 else 128
    heads = hidden // head_dim
    kv_heads = max(1, heads // 4)
    inter = round(hidden * 8 / 3 / 256) * 256
    if layers is None:
        layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_block(hidden)))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "vocab_size": VOCAB,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2, "dtype": "float32"}


def per_block(hidden: int) -> int:
    head_dim = 64 if hidden <= 2048 else 128
    kv = max(1, hidden // head_dim // 4) * head_dim
    inter = round(hidden * 8 / 3 / 256) * 256
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden


def tensor_shapes(config: dict):
    """(name, shape) of every tensor, in file order: embeddings, then block by block, then norm and head."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    yield "model.embed_tokens.weight", (v, h)
    for b in range(config["num_hidden_layers"]):
        p = f"model.layers.{b}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    return torch.randn(shape, generator=g) * 0.02


def write(config: dict, out: Path, shard_bytes: int, seed: int = 0) -> int:
    """Write the checkpoint into ``out`` (via a temporary sibling, renamed at the end); returns the parameter count."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = list(tensor_shapes(config))
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:  # plan the shards first, so each file's final name is known when it is written
        nbytes = 4 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    shape_of = dict(shapes)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shape_of[n], seed) for n in names}
        total += sum(t.numel() for t in tensors.values())
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        del tensors
        weight_map.update({n: file for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 4 * total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return total


def copy_tokenizer(directory: Path) -> None:
    from nmkit import models

    source = Path(models.materialised_path(models.resolve("smollm2-135m")))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, required=True, help="about how many parameters, e.g. 1.2e9")
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: chosen from --params)")
    p.add_argument("--layers", type=int, default=None, help="number of blocks (default: from --params)")
    p.add_argument("--shard-mb", type=int, default=1000, help="safetensors shard size in MB (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = shape_for(args.params, args.hidden, args.layers)
    total = write(config, args.out, args.shard_mb * 10**6, args.seed)
    print(json.dumps({"out": str(args.out), "parameters": total, "hidden": config["hidden_size"],
                      "layers": config["num_hidden_layers"], "intermediate": config["intermediate_size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
