"""Post-hoc gap-closing transforms against formulas computed a second way (numpy by hand)."""
import math

import numpy as np
import pytest
import torch

from openclip_align.metrics import centroid_gap, closing_lambda, fit_centring, fit_gap_shift, fit_posthoc
from openclip_align.metrics import fit_standardisation


def gapped_pairs(n=400, d=16, seed=0):
    """Two offset Gaussian clouds, not normalised (the transforms normalise first)."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(d)
    mu[0] = 1.0
    x = rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, d) / math.sqrt(d) + 0.5 * mu
    y = rng.standard_normal((n, d)) / math.sqrt(d) - 0.5 * mu
    return 3.0 * x, 0.5 * y


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_centring_makes_both_centroids_exactly_zero_on_the_fitted_pairs():
    x, y = gapped_pairs()
    transform = fit_centring(x, y)
    xc, yc = transform.apply(x, y, renormalise=False)
    np.testing.assert_allclose(xc.mean(axis=0), 0.0, atol=1e-15)
    np.testing.assert_allclose(yc.mean(axis=0), 0.0, atol=1e-15)
    # and the rows are the normalised inputs minus their own modality's mean
    np.testing.assert_allclose(xc, unit(x) - unit(x).mean(axis=0), atol=1e-15)
    out_x, out_y = transform.apply(x, y)
    np.testing.assert_allclose(np.linalg.norm(out_x, axis=1), 1.0, atol=1e-12)
    assert centroid_gap(out_x, out_y) < 0.2 * centroid_gap(x, y)


def test_centring_of_other_pairs_uses_the_fitted_means():
    x, y = gapped_pairs(seed=1)
    other_x, other_y = gapped_pairs(n=50, seed=2)
    transform = fit_centring(x, y)
    got = transform.image(other_x)
    expected = unit(other_x) - unit(x).mean(axis=0)
    np.testing.assert_allclose(got, unit(expected), atol=1e-12)
    np.testing.assert_allclose(transform.text(other_y), unit(unit(other_y) - unit(y).mean(axis=0)), atol=1e-12)


def test_standardised_dimensions_have_mean_zero_and_std_one_before_renormalisation():
    x, y = gapped_pairs()
    x[:, 3] = x[:, 0]                        # correlated dimensions stay correlated: only scaling is per dimension
    xs, ys = fit_standardisation(x, y).apply(x, y, renormalise=False)
    for a in (xs, ys):
        np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-13)
        np.testing.assert_allclose(a.std(axis=0), 1.0, rtol=1e-12)
    ux = unit(x)
    np.testing.assert_allclose(xs[:, 5], (ux[:, 5] - ux[:, 5].mean()) / ux[:, 5].std(), rtol=1e-12)


def test_a_dimension_constant_on_the_fitted_pairs_is_left_unscaled():
    x = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, -1.0], [1.0, 0.0, 0.5]])
    y = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
    xs, _ = fit_standardisation(x, y).apply(x, y, renormalise=False)
    assert np.isfinite(xs).all()


def test_closing_lambda_is_one_half_on_its_own_pairs_and_a_projection_otherwise():
    delta = np.array([0.3, -0.4, 0.0])
    assert closing_lambda(delta) == pytest.approx(0.5, abs=1e-15)
    target = np.array([0.6, 0.2, 1.0])
    lam = closing_lambda(delta, target)
    # minimise ||target - 2 lam delta||^2 by brute force on a fine grid
    grid = np.linspace(-2, 2, 400001)
    residual = ((target[None, :] - 2 * grid[:, None] * delta[None, :]) ** 2).sum(axis=1)
    assert lam == pytest.approx(grid[residual.argmin()], abs=1e-5)
    with pytest.raises(ValueError, match="zero"):
        closing_lambda(np.zeros(3))


def test_shift_at_the_closing_lambda_makes_the_centroids_coincide_before_renormalisation():
    x, y = gapped_pairs()
    transform = fit_gap_shift(x, y)
    assert transform.lam == 0.5
    delta = unit(x).mean(axis=0) - unit(y).mean(axis=0)
    xs, ys = transform.apply(x, y, renormalise=False)
    np.testing.assert_allclose(xs, unit(x) - 0.5 * delta, atol=1e-15)
    np.testing.assert_allclose(ys, unit(y) + 0.5 * delta, atol=1e-15)
    np.testing.assert_allclose(xs.mean(axis=0) - ys.mean(axis=0), 0.0, atol=1e-15)
    # after re-normalisation only the second-order residue of the unequal row norms remains
    out_x, out_y = transform.apply(x, y)
    assert centroid_gap(out_x, out_y) < 0.1 * np.linalg.norm(delta)


def test_shift_matches_the_symmetric_closed_form_after_renormalisation():
    # x_i = (c, s v_i), y_i = (-c, s v_i): delta = (2c, 0, 0), and at lambda = 1/2 both become (0, v_i): gap 0
    c, s = 0.6, 0.8
    v = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    x, y = np.hstack([np.full((4, 1), c), s * v]), np.hstack([np.full((4, 1), -c), s * v])
    out_x, out_y = fit_gap_shift(x, y).apply(x, y)
    np.testing.assert_allclose(out_x, np.hstack([np.zeros((4, 1)), v]), atol=1e-12)
    np.testing.assert_allclose(out_y, out_x, atol=1e-12)


def test_torch_in_torch_out_and_bad_inputs_are_clear():
    x, y = gapped_pairs(n=20, d=8)
    transform = fit_posthoc("centre", torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    out = transform.image(torch.tensor(x[:3], dtype=torch.float32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 8)
    with pytest.raises(ValueError, match="unknown post-hoc transform"):
        fit_posthoc("whiten", x, y)
    with pytest.raises(ValueError, match="dim 4 but"):
        transform.text(np.ones((2, 4)))
