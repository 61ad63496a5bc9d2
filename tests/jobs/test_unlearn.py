"""The unlearn job end to end on a cut-down quick configuration: base models cached, then reused."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the job sets one thread for its process
    yield
    torch.set_num_threads(threads)


def test_quick_unlearn_job_trains_caches_and_reuses_the_base_models(tmp_path, capsys, keep_threads):
    from lightning_losses.cli import main

    args = ["unlearn", "--quick", "--no-progress", "--output", str(tmp_path), "--methods", "npo_rt"]
    args += ["--base-epochs", "1", "--memorise-epochs", "1", "--unlearn-epochs", "1"]
    assert main(args) == 0
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.pt"))
    assert cached == ["original.pt", "pretrained.pt", "retain.pt"]
    rows = json.loads((tmp_path / "unlearn-quick.json").read_text())
    methods = [r["method"] for r in rows]
    assert methods == ["original (before unlearning)", "retain model (target)", "npo_rt"]
    capsys.readouterr()
    # a second run with other unlearning settings loads the three base models instead of training them
    assert main([*args[:-1], "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("loaded the cached") >= 3 and "training the" not in out
    # the β sweep (summed and per-token log-ratio) adds one row per β and the trade-off plot
    sweep = [*args[:-1], "1", "--methods", "npo", "--npo-betas", "0.1", "--normalized-npo-betas", "3"]
    assert main(sweep) == 0
    rows = json.loads((tmp_path / "unlearn-quick.json").read_text())
    assert [r["method"] for r in rows][2:] == [
        "npo",
        "NPO-RT, Σ log-ratio, β = 0.1",
        "NPO-RT, mean log-ratio per token, β = 3",
    ]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "trade_off-quick.png").stat().st_size > 1000
