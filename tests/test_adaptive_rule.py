"""The input-adaptive path rule (cam/sampling.adaptive_rule) in numpy: a partition of [0, 1] by
the inverse CDF of the probed |dS| plus a floor, one node per interval. Used by
tools/ig_completeness.py (measurements on the real Lite0: docs/ig-adaptive-2026-12-02.md)."""

import numpy as np
import pytest

from onnxcam.cam.sampling import adaptive_rule, path_rule


def test_flat_probe_gives_the_midpoint_rule():
    for probe in (np.zeros(65), np.linspace(0.0, 3.0, 129)):  # no change, or constant change: uniform
        alphas, weights = adaptive_rule(probe, 16)
        reference = path_rule("riemann_middle", 16)
        np.testing.assert_allclose(alphas, reference[0], atol=1e-12)
        np.testing.assert_allclose(weights, reference[1], atol=1e-12)


@pytest.mark.parametrize("placement", ["mid", "cdfmid"])
def test_partition_follows_the_change_of_s(placement):
    rng = np.random.default_rng(0)
    probe = np.cumsum(np.r_[0.0, rng.exponential(1.0, 128) * (np.arange(128) < 16) * 20 + 0.01])
    alphas, weights = adaptive_rule(probe, 32, floor=0.25, placement=placement)
    assert weights.min() > 0 and abs(weights.sum() - 1) < 1e-12
    bounds = np.r_[0.0, np.cumsum(weights)]
    assert np.all((bounds[:-1] <= alphas) & (alphas <= bounds[1:]))
    # 75 % of the density sits in the first 16/128 of the path (all the change) plus its floor share
    inside = (alphas < 16 / 128).sum()
    assert abs(inside - 32 * (0.75 + 0.25 * 16 / 128)) <= 1
    # the floor: the flat 7/8 of the path keeps its share of nodes, 32 * 0.25 * 7/8 = 7
    assert abs((alphas >= 16 / 128).sum() - 7) <= 1


def test_integrates_a_smooth_function():
    """A midpoint rule on a partition whose widths jump at probe cells (piecewise-linear CDF): on a
    smooth integrand it is far behind Gauss-Legendre (1e-15 here) and uniform midpoints (2e-5);
    measured -1.03e-3. Its use is the rough integrand of ReLU6 nets, not this one."""
    s = lambda a: np.tanh(8 * (a - 0.3))  # noqa: E731 -- S along the path; f = dS/da
    f = lambda a: 8 / np.cosh(8 * (a - 0.3)) ** 2  # noqa: E731
    alphas, weights = adaptive_rule(s(np.arange(257) / 256), 64)
    exact = s(1.0) - s(0.0)
    assert abs(weights @ f(alphas) - exact) < 2e-3 * exact
