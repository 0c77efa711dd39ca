"""kill -9 at each stage of a calibrated prune, then ``--resume``: the output is bit-identical to an
uninterrupted run, and nothing is left behind (issue 13, items 3, 9, 15 and the kill matrix).

The interrupted runs are real processes killed with SIGKILL by the ``NMKIT_FAULT`` hook
(:mod:`nmkit.faults`). To keep the matrix fast, one helper process imports nmkit, torch and
transformers once and forks a child per kill point; each child runs the CLI and dies at its point.
The resumed runs then run here, in-process, from what the dead child left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nmkit.cli import main

# Every stage of a 2-block prune: inside a block, between a block's checkpoint files, between its files
# and the commit, between blocks, after the last block, inside the final save, between the save and
# the checkpoint's removal.
KILL_POINTS = ["mid-block-0", "between-files-0", "after-commit-0", "mid-block-1", "before-commit-1",
               "after-commit-1", "during-save", "after-save"]

_FORKER = r"""
import json, os, sys
from nmkit.cli import main
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported once, before forking

result = {}
for fault, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ["NMKIT_FAULT"] = fault
        try:
            code = main(argv)
        except BaseException:
            code = 99
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    result[fault] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
print(json.dumps(result))
"""


def _argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["prune", str(model), "--method", "sparsegpt", "--calib-samples", "4", "--calib-seqlen", "32",
            "--no-eval", "--data-dir", str(data), "--out", str(out), "--json"]


def _tensors(out: Path) -> dict:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def killed_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    cases = [(fault, _argv(tiny_model_dir, tiny_data_dir, root / fault / "out")) for fault in KILL_POINTS]
    for fault in KILL_POINTS:
        (root / fault).mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _FORKER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(root / "after-commit-0" / "out.nmkit-ckpt", root / "spare-ckpt")  # for a test that keeps it
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(_argv(tiny_model_dir, tiny_data_dir, out)) == 0
    return out


@pytest.mark.parametrize("fault", KILL_POINTS)
def test_kill9_then_resume_is_bit_identical(fault, killed_runs, uninterrupted, tiny_model_dir, tiny_data_dir,
                                            capsys):
    root, codes = killed_runs
    assert codes[fault] == -signal.SIGKILL  # the hook really killed the process at that point
    out = root / fault / "out"
    ckpt = out.with_name("out.nmkit-ckpt")
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".out.")]
    if fault == "during-save":  # item 15: a killed save leaves its hidden temporary directory...
        assert leftovers and not out.exists() and (ckpt / "state.json").is_file()  # item 3: ...and the checkpoint
    if fault == "after-save":
        assert out.is_dir() and ckpt.is_dir()

    code = main(_argv(tiny_model_dir, tiny_data_dir, out) + ["--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    if fault == "after-save":
        assert "nothing to resume" in err
    if fault == "during-save":
        assert "left by an interrupted run" in err  # ...which the next run removes
    whole, resumed = _tensors(uninterrupted), _tensors(out)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert whole[name].dtype == resumed[name].dtype and whole[name].equal(resumed[name]), name
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] == json.loads((uninterrupted / "report.json").read_text())["layers"]
    assert not ckpt.exists() and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_rerun_without_resume_keeps_an_interrupted_checkpoint(killed_runs, tiny_model_dir, tiny_data_dir,
                                                              tmp_path, capsys):
    """A run killed after block 0 is never discarded silently: a plain rerun is refused and says --resume."""
    root, _ = killed_runs
    out = tmp_path / "out"
    ckpt = tmp_path / "out.nmkit-ckpt"
    shutil.copytree(root / "spare-ckpt", ckpt)
    code = main(_argv(tiny_model_dir, tiny_data_dir, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--resume" in err and "1 blocks done" in err and (ckpt / "state.json").is_file()
