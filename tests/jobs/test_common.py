"""The statistics the main jobs print: paired differences with t intervals, bootstrap intervals, job settings."""

from __future__ import annotations

import argparse
import math
import statistics

import pytest
import torch

from lightning_losses.jobs.common import PairedDifference, bootstrap_interval


@pytest.mark.parametrize("n", [2, 3, 5, 10, 31, 40])
def test_paired_difference_is_the_t_interval_of_the_per_seed_differences(n):
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(n)
    a = torch.rand(n, generator=generator).tolist()
    b = torch.rand(n, generator=generator).tolist()
    d = PairedDifference.of(a, b, scale=100.0)
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    quantile = scipy_stats.t.ppf(0.975, n - 1) if n <= 31 else scipy_stats.norm.ppf(0.975)
    half = quantile * statistics.stdev(diffs) / math.sqrt(n)
    assert d.mean == pytest.approx(statistics.fmean(diffs))
    assert d.low == pytest.approx(d.mean - half, rel=1e-3)
    assert d.high == pytest.approx(d.mean + half, rel=1e-3)
    assert d.n == n and d.to_json()["n"] == n


def test_paired_difference_labels_what_the_seeds_cannot_resolve():
    gain = PairedDifference.of([0.96, 0.97, 0.95, 0.96], [0.94, 0.95, 0.93, 0.95])
    assert gain.resolved and gain.low > 0 and "(noise)" not in str(gain)
    noise = PairedDifference.of([0.96, 0.93, 0.95], [0.94, 0.95, 0.95])
    assert not noise.resolved and str(noise).endswith("(noise)")
    assert str(PairedDifference.of([0.9], [0.8], scale=100)) == "+10.00 (1 seed)"
    with pytest.raises(ValueError, match="as many entries on each side"):
        PairedDifference.of([0.9, 0.8], [0.8])


def test_bootstrap_interval_covers_the_mean_of_normal_samples_about_95_percent():
    generator = torch.Generator().manual_seed(0)
    covered = 0
    for trial in range(40):
        x = torch.randn(200, generator=generator)
        low, high = bootstrap_interval(lambda i, x=x: float(x[i].mean()), len(x), rounds=200, seed=trial)
        covered += low <= 0.0 <= high
        assert low < float(x.mean()) < high
    assert 32 <= covered <= 40  # 95 % nominal: 38 expected, binomial spread over 40 trials


def test_distill_job_settings_scale_dkd_beta_and_pair_seeds():
    from lightning_losses.jobs import distill

    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    default = distill._setting(parser.parse_args([]))
    assert default.seeds >= 5 and default.epochs >= 30 and default.methods[0] == "ce"
    full = distill._setting(parser.parse_args(["--full"]))
    assert set(full.methods) == set(distill.METHODS) and full.seeds >= default.seeds
    assert distill._setting(parser.parse_args(["--student-samples", "0"])).student_samples is None
    module = distill._student_module("dkd", distill.ConvNet(width=8), default, torch.arange(1000))
    assert float(module.kd.beta) == distill.FEW_CLASS_BETA
    assert float(module.kd.warmup_epochs) == default.warmup
    # CRD banks the student's training images only (global ids), with RepDistiller's share of negatives
    crd = distill._student_module("crd", distill.ConvNet(width=8), default, torch.arange(0, 3000, 3)).crd
    assert crd.num_samples == 1000 and crd.num_negatives == 1000 * 16384 // 50000
    assert torch.equal(crd.sample_ids, torch.arange(0, 3000, 3))
    assert float(crd.temperature) == distill.CRD_TEMPERATURE
    with pytest.raises(SystemExit, match="Unknown methods"):
        distill._setting(parser.parse_args(["--methods", "ce,nope"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--quick", "--full"])


def test_time_split_groups_phases_and_accounts_for_all_the_time():
    import re

    from lightning_losses.jobs.common import TimeSplit

    split = TimeSplit()
    split.add("data loading", 1.0)
    split.train("teacher", 2.0)
    with split.phase("training/students") as timer:
        pass
    split.add("training/students", 3.0)
    line = split.line()
    assert line.startswith("time split (s): ")
    assert "data loading 1.0" in line
    assert re.search(r"training 5\.0 \(teacher 2\.0, students 3\.0\)", line)
    other = float(re.search(r"other (-?[\d.]+)", line).group(1))
    assert other <= 0.1 and timer.seconds < 0.1  # only the 6 s added by hand are "ahead" of the clock
