"""The temperature job's pieces: symmetric label noise, the robust-loss classifier, and a quick end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_losses.jobs.temperature import NoisyLabelClassifier, symmetric_label_noise


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4])
def test_symmetric_noise_flips_the_requested_fraction_to_other_classes_uniformly(rate):
    y = torch.arange(10).repeat(500)
    noisy = symmetric_label_noise(y, rate, 10, seed=1)
    flipped = noisy != y
    assert int(flipped.sum()) == round(rate * len(y))
    if rate:
        offsets = torch.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
        assert offsets[0] == 0 and bool((offsets[1:] > 0.6 * flipped.sum() / 9).all())
    with pytest.raises(ValueError, match=r"rate.*\[0, 1\)"):
        symmetric_label_noise(y, 1.0, 10)


def test_aldr_classifier_updates_lambda_of_the_batch_only():
    module = NoisyLabelClassifier(torch.nn.Linear(4, 3), loss="aldr_kl", num_samples=20)
    batch = (torch.randn(5, 4) * 30, torch.tensor([0, 1, 2, 0, 1]), torch.tensor([3, 4, 5, 6, 7]))
    module.training_step(batch, 0)
    changed = torch.nonzero(module.aldr.lambdas != 10.0).flatten().tolist()
    assert set(changed) <= {3, 4, 5, 6, 7} and changed


@pytest.mark.slow
def test_quick_job_runs_end_to_end(tmp_path):
    from lightning_losses.cli import main

    assert main(["temperature", "--quick", "--output", str(tmp_path)]) == 0
    assert "TempNet" in (tmp_path / "lm.md").read_text() and "ALDR-KL" in (tmp_path / "mnist.md").read_text()
    assert "control: fixed τ" in (tmp_path / "lm.md").read_text()  # the fixed-τ DRO control row
    spread = json.loads((tmp_path / "mnist_lambda.json").read_text())
    assert [row["λ0"] for row in spread] == ["1"]
