import pytest
import torch

from nmkit.patterns import NM, Dense, PatternError, Unstructured, group_counts, parse, summarize


@pytest.mark.parametrize(
    "spec, expected",
    [("2:4", NM(2, 4)), (" 1 : 4 ", NM(1, 4)), ("2:8", NM(2, 8)), ("63:64", NM(63, 64)),
     ("50%", Unstructured(0.5)), ("12.5%", Unstructured(0.125)), ("dense", Dense()), ("DENSE", Dense())],
)
def test_parse_valid(spec, expected):
    assert parse(spec) == expected


@pytest.mark.parametrize("spec", ["4:2", "2:0", "0:4", "4:4", "2:65", "abc", "2:4:8", "", "-1:4", "100%", "2/4"])
def test_parse_invalid_explains_convention(spec):
    with pytest.raises(PatternError) as err:
        parse(spec)
    msg = str(err.value)
    assert "keep N of every M" in msg and "'2:4'" in msg


def test_keep_convention_and_density():
    # "2:8" keeps 2 of 8: 75% sparse (the SparseGPT/Wanda scripts' "prune N" reading would give 25%).
    assert NM.parse("2:8").sparsity == pytest.approx(0.75)
    assert NM.parse("1:4").density == pytest.approx(0.25)
    assert str(NM(2, 4)) == "2:4" and str(Unstructured(0.5)) == "50%"


def test_nm_parse_rejects_non_nm():
    with pytest.raises(PatternError):
        NM.parse("50%")
    with pytest.raises(PatternError):
        NM(3, 2)


def test_is_valid_counts_nonzeros():
    p = NM(2, 4)
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert p.is_valid(w) and not p.is_valid(w, exact=True)
    w[0, 1] = 5.0
    assert not p.is_valid(w)
    assert p.is_valid(w.T, dim=0) is False


def test_tail_policies_in_validation():
    p = NM(1, 4)
    w = torch.tensor([[1.0, 0, 0, 0, 1.0, 1.0]])
    assert not p.is_valid(w)  # tail="error": size 6 not divisible by 4
    assert not p.is_valid(w, tail="pad")  # partial group keeps 2 > 1
    assert p.is_valid(w, tail="dense")
    assert group_counts(w, 4, tail="pad").tolist() == [[1, 2]]


def test_summarize():
    w = torch.zeros(8, 16)
    w[:, ::4] = 1.0
    s = summarize(w, "2:4")
    assert s["valid"] and s["sparsity"] == pytest.approx(0.75) and s["violating_groups"] == 0
    w[0, 1] = w[0, 2] = 1.0
    s = summarize(w, "2:4")
    assert not s["valid"] and s["violating_groups"] == 1
