"""The ``calibrate`` job end to end on the small embedded digits data (one epoch, a few methods)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_losses.cli import main


@pytest.mark.slow
def test_calibrate_job_writes_table_and_diagrams(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    code = main(
        [
            "calibrate",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--width",
            "4",
            "--calibrators",
            "temperature,histogram",
            "--losses",
            "dca",
            "--no-progress",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "calibrate.json").read_text())
    assert [r["kind"] for r in rows] == ["-", "post-hoc", "post-hoc", "train-time", "sets", "sets", "sets"]
    assert rows[0]["acc %"] == rows[1]["acc %"]  # temperature scaling keeps every prediction
    assert rows[0]["Δ ECE vs uncalibrated, pp [95 % CI]"] is None
    for row in rows[4:]:  # the conformal sets of the cross-entropy model: coverage and size, no calibration scores
        assert 0.0 <= row["coverage %"] <= 100.0 and row["set size"] >= 0.0 and row["ECE % [95 % CI]"] is None
    assert all(row["coverage %"] is None for row in rows[:4])
    for row in rows[1:4]:  # the change against the uncalibrated model, with its paired bootstrap interval
        change = row["Δ ECE vs uncalibrated, pp [95 % CI]"]
        assert change["low"] <= change["mean"] <= change["high"]
    for name in ("uncalibrated", "temperature", "histogram", "dca"):
        assert (tmp_path / f"reliability_{name}.png").stat().st_size > 1000


def test_calibrate_job_rejects_unknown_methods(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="Unknown calibrators"):
        main(["calibrate", "--calibrators", "no-such-calibrator", "--output", str(tmp_path)])
