"""Modality-gap metrics against hand-computed / brute-force expectations (docs/methods.md, modality-gap metrics)."""
import math
import tracemalloc

import numpy as np
import pytest
import torch

from openclip_align.metrics import (
    alignment,
    alignment_score,
    centroid_gap,
    instance_gap,
    joint_uniformity,
    centred_spectrum,
    effective_rank,
    feature_norm_stats,
    mean_intra_cosine,
    modality_gap_report,
    rmg,
    separability,
    top_variance_share,
    uniformity,
)
from openclip_align.metrics import gap as gap_module

KEYS = {"centroid_gap", "centroid_gap_sq_per_dim", "effective_rank_image", "effective_rank_text",
        "top2_variance_share_image", "top2_variance_share_text", "instance_gap", "alignment_score", "alignment", "uniformity_image", "uniformity_text",
        "uniformity_joint", "rmg", "separability", "cone_image", "cone_text", "n_pairs", "n_subsampled"}


# --- brute-force references written independently of the library (plain loops) ------------------
def _unit(rows):
    return [list(np.asarray(r, dtype=float) / math.sqrt(sum(v * v for v in r))) for r in rows]


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v))


def _sqdist(u, v):
    return sum((a - b) ** 2 for a, b in zip(u, v))


def brute_uniformity(rows):
    u = _unit(rows)
    vals = [math.exp(-2 * _sqdist(u[i], u[j])) for i in range(len(u)) for j in range(i + 1, len(u))]
    return math.log(sum(vals) / len(vals))


def brute_mean_offdiag_cos(rows):
    u = _unit(rows)
    vals = [_cos(u[i], u[j]) for i in range(len(u)) for j in range(len(u)) if i != j]
    return sum(vals) / len(vals)


def brute_rmg(xr, yr):
    x, y = _unit(xr), _unit(yr)
    n = len(x)
    d = lambda a, b: (1 - _cos(a, b)) / 2  # noqa: E731
    m = max(sum(d(x[i], y[i]) for i in range(n)) / n, 1e-3)
    intra_x = sum(d(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    intra_y = sum(d(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return m / (m + 0.5 * (intra_x + intra_y))


def brute_centroid_gap(xr, yr):
    x, y = _unit(xr), _unit(yr)
    n, dim = len(x), len(x[0])
    delta = [sum(x[i][k] for i in range(n)) / n - sum(y[i][k] for i in range(n)) / n for k in range(dim)]
    return math.sqrt(sum(v * v for v in delta))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- identical modalities ----------------------------------------------------------------------
def test_identical_modalities_have_no_gap_and_rmg_at_its_floor():
    # Four points +-e1, +-e2 (both modalities). Pairwise cosines: two antipodal pairs (-1), four
    # orthogonal pairs (0) -> mean_{i!=j} cos = -2/6 = -1/3, mean_{i!=j} d = (1 + 1/3) / 2 = 2/3.
    # Paired distance is 0, so m is clamped to 1e-3: RMG = 1e-3 / (1e-3 + 0.5 * (2/3 + 2/3)).
    pts = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=float)
    rep = modality_gap_report(pts, 5.0 * pts)  # scaling must not matter: rows are normalised inside
    assert rep["centroid_gap"] == pytest.approx(0.0, abs=1e-12)
    assert rep["instance_gap"] == pytest.approx(0.0, abs=1e-12)
    assert rep["alignment_score"] == pytest.approx(1.0, abs=1e-12)
    assert rep["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert rep["rmg"] == pytest.approx(1e-3 / (1e-3 + 2.0 / 3.0), rel=1e-12)
    assert rep["cone_image"] == pytest.approx(-1.0 / 3.0, abs=1e-12)
    assert rep["cone_text"] == pytest.approx(-1.0 / 3.0, abs=1e-12)
    # same points in both modalities -> all three uniformities equal... except the joint one, which
    # also sees each point's twin (distance 0): do it by hand below.
    u4 = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)
    assert rep["uniformity_image"] == pytest.approx(u4, rel=1e-12)
    assert rep["uniformity_text"] == pytest.approx(u4, rel=1e-12)
    # union of 8 points = each of the 4 twice: of the 28 pairs, 4 are twins (kernel 1),
    # 2*4 = 8 are antipodal (e^-8) [each antipodal pair of the 4 appears 4 times: 2 x 4 = 8],
    # and 16 are orthogonal (e^-4) [4 orthogonal pairs x 4].
    joint = math.log((4 * 1.0 + 8 * math.exp(-8) + 16 * math.exp(-4)) / 28)
    assert rep["uniformity_joint"] == pytest.approx(joint, rel=1e-12)
    assert KEYS <= rep.keys()
    assert rep["n_pairs"] == 4 and rep["n_subsampled"] == 4


def test_identical_random_modalities(rng):
    x = rng.standard_normal((40, 8))
    rep = modality_gap_report(x, x.copy())
    assert rep["centroid_gap"] == pytest.approx(0.0, abs=1e-12)
    intra = (1 - brute_mean_offdiag_cos(x)) / 2
    assert rep["rmg"] == pytest.approx(1e-3 / (1e-3 + intra), rel=1e-10)


# --- opposite clusters -------------------------------------------------------------------------
def test_two_opposite_clusters_gap_two():
    n, d = 30, 5
    x = np.zeros((n, d))
    x[:, 0] = 1.0
    y = -x
    rep = modality_gap_report(x, y)
    assert rep["centroid_gap"] == pytest.approx(2.0, abs=1e-12)
    assert rep["instance_gap"] == pytest.approx(2.0, abs=1e-12)
    assert rep["alignment_score"] == pytest.approx(-1.0, abs=1e-12)
    assert rep["alignment"] == pytest.approx(4.0, abs=1e-12)
    assert rep["cone_image"] == pytest.approx(1.0, abs=1e-12)
    assert rep["cone_text"] == pytest.approx(1.0, abs=1e-12)
    # m = (1 - (-1)) / 2 = 1; intra distances 0 -> RMG = 1
    assert rep["rmg"] == pytest.approx(1.0, abs=1e-12)
    assert rep["uniformity_image"] == pytest.approx(0.0, abs=1e-12)  # all kernels exp(0) = 1
    # union: 2 * C(n, 2) same-cluster pairs (kernel 1) and n^2 cross pairs (||e1 + e1||^2 = 4 -> e^-8)
    joint = math.log((n * (n - 1) + n * n * math.exp(-8)) / (2 * n * (2 * n - 1) / 2))
    assert rep["uniformity_joint"] == pytest.approx(joint, rel=1e-12)
    assert rep["separability"] == 1.0


def test_noisy_opposite_clusters_gap_close_to_two(rng):
    mu = np.zeros(16)
    mu[3] = 1.0
    x = mu + 0.01 * rng.standard_normal((200, 16))
    y = -mu + 0.01 * rng.standard_normal((200, 16))
    # after normalisation the mu-component is ~1 - ||noise||^2 / 2 = 1 - 15e-4 / 2 per side
    assert centroid_gap(x, y) == pytest.approx(2.0 * (1 - 15e-4 / 2), abs=3e-4)
    assert separability(x, y) == 1.0


# --- invariances -------------------------------------------------------------------------------
def test_rotation_invariance(rng):
    n, d = 300, 24
    x = rng.standard_normal((n, d)) + 0.8
    y = rng.standard_normal((n, d)) - 0.3
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    base = modality_gap_report(x, y, max_pairs=200)
    rot = modality_gap_report(x @ q, y @ q, max_pairs=200)
    for key in KEYS - {"separability"}:
        assert rot[key] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key
    # L2-regularised logistic regression is rotation invariant too, up to solver tolerance
    assert rot["separability"] == pytest.approx(base["separability"], abs=0.05)


# --- closed forms on hand-placed points --------------------------------------------------------
def test_uniformity_three_points_at_120_degrees():
    # Pairwise cos = -1/2 -> squared distance 2 - 2 * (-1/2) = 3 -> kernel e^-6 -> log mean = -6.
    s = math.sqrt(3) / 2
    pts = np.array([[1.0, 0.0], [-0.5, s], [-0.5, -s]])
    assert uniformity(pts) == pytest.approx(-6.0, rel=1e-12)
    assert uniformity(torch.tensor(pts)) == pytest.approx(-6.0, rel=1e-12)


def test_uniformity_four_points():
    pts = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, -1.0]]
    # normalised: e1, e2, e3, -e3 -> squared distances: e1-e2, e1-e3, e1-(-e3), e2-e3, e2-(-e3) = 2; e3-(-e3) = 4
    expected = math.log((5 * math.exp(-4) + math.exp(-8)) / 6)
    assert uniformity(np.array(pts)) == pytest.approx(expected, rel=1e-12)
    assert brute_uniformity(pts) == pytest.approx(expected, rel=1e-12)


def test_closed_forms_match_brute_force(rng):
    x = rng.standard_normal((25, 6)) + 0.5
    y = rng.standard_normal((25, 6)) - 0.5
    rep = modality_gap_report(x, y, max_pairs=None)
    assert rep["centroid_gap"] == pytest.approx(brute_centroid_gap(x, y), rel=1e-12)
    assert rep["cone_image"] == pytest.approx(brute_mean_offdiag_cos(x), rel=1e-10)
    assert rep["cone_text"] == pytest.approx(brute_mean_offdiag_cos(y), rel=1e-10)
    assert rep["rmg"] == pytest.approx(brute_rmg(x, y), rel=1e-10)
    assert rep["uniformity_image"] == pytest.approx(brute_uniformity(x), rel=1e-10)
    assert rep["uniformity_text"] == pytest.approx(brute_uniformity(y), rel=1e-10)
    assert rep["uniformity_joint"] == pytest.approx(brute_uniformity(np.vstack([x, y])), rel=1e-10)
    xu, yu = _unit(x), _unit(y)
    cos_i = [_cos(a, b) for a, b in zip(xu, yu)]
    assert rep["alignment_score"] == pytest.approx(sum(cos_i) / 25, rel=1e-12)
    assert rep["alignment"] == pytest.approx(sum(_sqdist(a, b) for a, b in zip(xu, yu)) / 25, rel=1e-12)
    assert rep["alignment"] == pytest.approx(2 - 2 * rep["alignment_score"], rel=1e-12)
    assert rep["instance_gap"] == pytest.approx(sum(math.sqrt(_sqdist(a, b)) for a, b in zip(xu, yu)) / 25,
                                                rel=1e-12)
    # single-metric functions agree with the report
    assert centroid_gap(x, y) == rep["centroid_gap"]
    assert instance_gap(x, y) == rep["instance_gap"]
    assert alignment_score(x, y) == rep["alignment_score"]
    assert alignment(x, y) == rep["alignment"]
    assert rmg(x, y) == rep["rmg"]
    assert mean_intra_cosine(x) == pytest.approx(rep["cone_image"], rel=1e-12)
    assert joint_uniformity(x, y, max_pairs=None) == pytest.approx(rep["uniformity_joint"], rel=1e-12)


def test_blocked_and_float32_paths_match_brute_force(rng, monkeypatch):
    x = rng.standard_normal((37, 5)) + 0.3
    y = rng.standard_normal((37, 5))
    expected = brute_uniformity(np.vstack([x, y]))
    monkeypatch.setattr(gap_module, "_BLOCK_ELEMENTS", 50)  # blocks of one or two rows
    assert joint_uniformity(x, y, max_pairs=None) == pytest.approx(expected, rel=1e-10)
    assert uniformity(x, max_rows=None) == pytest.approx(brute_uniformity(x), rel=1e-10)
    monkeypatch.setattr(gap_module, "_FLOAT64_GRAM_LIMIT", 0)  # float32 Gram blocks
    assert joint_uniformity(x, y, max_pairs=None) == pytest.approx(expected, rel=1e-5)
    from openclip_align.metrics import _arrays

    monkeypatch.setattr(_arrays, "BLOCK_ROWS", 4)
    assert centroid_gap(x, y) == pytest.approx(brute_centroid_gap(x, y), rel=1e-12)


# --- subsampling -------------------------------------------------------------------------------
def test_subsampled_terms_agree_with_exact(rng):
    n, d = 800, 12
    x = rng.standard_normal((n, d)) + 0.4
    y = rng.standard_normal((n, d)) - 0.2
    exact = modality_gap_report(x, y, max_pairs=None)
    sub = modality_gap_report(x, y, max_pairs=300, seed=3)
    assert exact["n_subsampled"] == n and sub["n_subsampled"] == 300
    for key in ("uniformity_image", "uniformity_text", "uniformity_joint"):
        assert sub[key] == pytest.approx(exact[key], abs=0.05), key
    assert sub["separability"] == pytest.approx(exact["separability"], abs=0.12)
    # the linear-in-N terms never subsample: identical
    for key in ("centroid_gap", "instance_gap", "alignment_score", "rmg", "cone_image", "cone_text"):
        assert sub[key] == exact[key], key
    # deterministic for a seed
    assert modality_gap_report(x, y, max_pairs=300, seed=3) == sub


def test_subsample_of_exactly_known_uniformity():
    # Every subsample of 120-degree triples repeated: cannot check directly, so use points on which
    # every pair has the same distance (a regular simplex): any subsample gives the same value.
    d = 40
    simplex = np.eye(d) - 1.0 / d  # rows of a centred identity: regular simplex, cos = -1/(d-1)
    sq = 2 - 2 * (-1.0 / (d - 1))
    assert uniformity(simplex, max_rows=10, seed=5) == pytest.approx(-2 * sq, rel=1e-12)
    assert uniformity(simplex, max_rows=None) == pytest.approx(-2 * sq, rel=1e-12)


# --- separability ------------------------------------------------------------------------------
def test_separability_same_distribution_is_chance(rng):
    x = rng.standard_normal((1500, 16))
    y = rng.standard_normal((1500, 16))
    assert 0.42 <= separability(x, y, seed=0) <= 0.58


def test_separability_separated_clusters(rng):
    mu = rng.standard_normal(32)
    x = mu + 0.3 * rng.standard_normal((500, 32))
    y = -mu + 0.3 * rng.standard_normal((500, 32))
    assert separability(x, y) == 1.0


# --- input handling ----------------------------------------------------------------------------
def test_torch_inputs_match_numpy(rng):
    x = rng.standard_normal((60, 8)).astype(np.float32)
    y = rng.standard_normal((60, 8)).astype(np.float32)
    a = modality_gap_report(x, y)
    b = modality_gap_report(torch.from_numpy(x), torch.from_numpy(y))
    assert a == b
    c = modality_gap_report(torch.from_numpy(x).bfloat16(), torch.from_numpy(y).half())
    assert c["centroid_gap"] == pytest.approx(a["centroid_gap"], abs=0.02)
    if torch.cuda.is_available():
        d = modality_gap_report(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
        assert d == a


@pytest.mark.parametrize("x,y,match", [
    (np.ones((4, 3)), np.ones((5, 3)), "same shape"),
    (np.ones((4, 3)), np.ones((4, 2)), "same shape"),
    (np.ones((1, 3)), np.ones((1, 3)), "at least 2"),
    (np.ones(3), np.ones(3), "2-D"),
])
def test_shape_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        modality_gap_report(x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_rejected(rng, bad):
    x = rng.standard_normal((10, 4))
    y = rng.standard_normal((10, 4))
    y[7, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf.*row 7"):
        modality_gap_report(x, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        centroid_gap(y, x)


def test_zero_row_rejected(rng):
    x = rng.standard_normal((10, 4))
    x[3] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        modality_gap_report(x, rng.standard_normal((10, 4)))


# --- dimensional collapse: effective rank, top-2 variance share ------------------------------------
def test_effective_rank_hand_worked_cases():
    # e1, e2, e3: centred rows are an equilateral triangle in a plane -> two equal singular values -> 2.
    assert effective_rank(np.eye(3)) == pytest.approx(2.0, abs=1e-12)
    # +-e1, +-e2, +-e3 (already centred): three equal singular values -> 3, top two hold 2/3 of the variance.
    six = np.vstack([np.eye(3), -np.eye(3)])
    assert effective_rank(six) == pytest.approx(3.0, abs=1e-12)
    assert top_variance_share(centred_spectrum(six), 2) == pytest.approx(2 / 3, abs=1e-12)
    # +-e1 (x2), +-e2: scatter diag(4, 2) -> sigma (2, sqrt 2) -> p = (2, sqrt 2) / (2 + sqrt 2)
    rows = np.array([[1, 0], [-1, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)
    p = np.array([2.0, math.sqrt(2)]) / (2 + math.sqrt(2))
    assert effective_rank(rows) == pytest.approx(math.exp(-(p * np.log(p)).sum()), abs=1e-12)
    assert top_variance_share(centred_spectrum(rows), 1) == pytest.approx(4 / 6, abs=1e-12)


def test_effective_rank_ignores_row_scale_and_a_constant_direction():
    """Rows are L2-normalised first: rescaling rows changes nothing; one repeated row leaves nothing (0)."""
    rows = np.vstack([np.eye(3), -np.eye(3)])
    scaled = rows * np.array([[0.1], [3.0], [7.0], [2.0], [0.5], [9.0]])
    assert effective_rank(scaled) == pytest.approx(3.0, abs=1e-12)
    assert effective_rank(np.tile([[0.6, 0.8]], (5, 1))) == 0.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_data_has_effective_rank_about_k(rng, k):
    basis = np.linalg.qr(rng.standard_normal((48, k)))[0]           # a k-dim subspace of R^48
    data = rng.standard_normal((6000, k)) @ basis.T
    rank = effective_rank(data)
    if k == 1:        # +-u after normalisation: one direction, exactly rank 1
        assert rank == pytest.approx(1.0, abs=1e-9)
    else:
        assert k - 0.05 * k < rank <= k + 1e-9
    assert top_variance_share(centred_spectrum(data), 2) == pytest.approx(min(1.0, 2 / k), abs=0.03)


def test_isotropic_data_has_effective_rank_about_dim(rng):
    rank = effective_rank(rng.standard_normal((20000, 32)))
    assert 31.5 < rank <= 32.0


def test_effective_rank_rotation_invariant_and_torch_equal(rng):
    data = rng.standard_normal((500, 12)) * np.linspace(0.2, 3.0, 12)    # anisotropic
    rotation = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    assert effective_rank(data @ rotation) == pytest.approx(effective_rank(data), rel=1e-10)
    share = top_variance_share(centred_spectrum(data), 2)
    assert top_variance_share(centred_spectrum(data @ rotation), 2) == pytest.approx(share, rel=1e-10)
    assert effective_rank(torch.from_numpy(data)) == pytest.approx(effective_rank(data), rel=1e-12)


def test_effective_rank_matches_svd_of_the_centred_matrix(rng):
    data = rng.standard_normal((300, 10)) @ rng.standard_normal((10, 10))
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    sigma = np.linalg.svd(unit - unit.mean(axis=0), compute_uv=False)
    p = sigma / sigma.sum()
    assert effective_rank(data) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    report = modality_gap_report(data, rng.standard_normal((300, 10)))
    assert report["effective_rank_image"] == pytest.approx(effective_rank(data), rel=1e-12)
    assert report["top2_variance_share_image"] == pytest.approx((sigma[:2] ** 2).sum() / (sigma ** 2).sum(),
                                                                rel=1e-9)


# --- the gap in CLIP-Refine's convention, raw feature norms ---------------------------------------
def test_centroid_gap_sq_per_dim_is_torch_mse_of_the_normalised_means(rng):
    x = torch.from_numpy(rng.standard_normal((200, 16)) + 0.3)
    y = torch.from_numpy(rng.standard_normal((200, 16)) - 0.2)
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    expected = torch.nn.functional.mse_loss(xn.mean(0), yn.mean(0)).item()      # the authors' test-time formula
    report = modality_gap_report(x, y)
    assert report["centroid_gap_sq_per_dim"] == pytest.approx(expected, rel=1e-10)
    assert report["centroid_gap_sq_per_dim"] == pytest.approx(report["centroid_gap"] ** 2 / 16, rel=1e-10)


def test_feature_norm_stats_of_raw_features(rng):
    x = torch.from_numpy(rng.standard_normal((300, 8)) * 5.0)
    y = torch.from_numpy(rng.standard_normal((300, 8)) * 2.0 + 1.0)
    stats = feature_norm_stats(x, y)
    assert stats["mean_norm_image"] == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-12)
    assert stats["mean_norm_text"] == pytest.approx(y.norm(dim=1).mean().item(), rel=1e-12)
    raw_mse = torch.nn.functional.mse_loss(x.mean(0), y.mean(0)).item()          # the authors' training-log formula
    assert stats["centroid_gap_sq_per_dim_raw"] == pytest.approx(raw_mse, rel=1e-10)
    with pytest.raises(ValueError, match="NaN or inf"):
        feature_norm_stats(x, torch.full_like(y, float("nan")))


# --- scale ---------------------------------------------------------------------------------------
def test_100k_by_768_is_memory_light():
    """100k x 768 pairs: an N x N float32 matrix alone would be 40 GB; peak allocations here must stay
    a small fraction of the inputs (~300 MB each). The benchmark times this call on every run
    (results.json: metric_seconds_100k_pairs_768d)."""
    rng = np.random.default_rng(0)
    n, d = 100_000, 768
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.standard_normal((n, d), dtype=np.float32)
    y += 0.05
    tracemalloc.start()
    try:
        rep = modality_gap_report(x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"
    assert rep["n_pairs"] == n and rep["n_subsampled"] == 5000
    # i.i.d. isotropic Gaussian, texts shifted by mu = 0.05 * ones: cos(y_i, y_j) ~ ||mu||^2 / (d + ||mu||^2)
    assert abs(rep["cone_image"]) < 1e-4
    assert rep["cone_text"] == pytest.approx(0.05 ** 2 / (1 + 0.05 ** 2), abs=2e-4)
    assert all(math.isfinite(rep[k]) for k in KEYS)
