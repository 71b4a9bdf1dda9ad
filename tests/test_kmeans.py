"""k-means (lowrank_ops.engine.kmeans) against a float64 numpy Lloyd reference and exact identities.

Thresholds and why:
- labels are compared exactly: from the same initial centroids, float32 and float64 Lloyd make the same choices unless
  a point is equidistant from two centroids to ~1e-6 relative, which the test data (drawn once, fixed seeds) avoids.
- float32 centroids are compared with the float64 reference to 1e-5 relative: each is a mean of float32 data,
  rounded at ~6e-8 per operation.
- "inertia never increases" allows 1e-6 relative slack: each step minimises the exact objective, but the assignment
  uses the float32 expanded distance, which can pick a centroid farther by ~eps (||x||^2 + ||c||^2).
- chunked vs unchunked, batched vs single and weights=1 vs none are compared bitwise: they split only the rows of
  GEMMs (see the module docstring), which on CPU computes every row the same way.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import requires_gpu

import lowrank_ops.engine.kmeans  # noqa: F401  (the package attribute `kmeans` is the function)
from lowrank_ops.engine.kmeans import KMeansResult, kmeans, kmeans_many

kmeans_module = sys.modules["lowrank_ops.engine.kmeans"]

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# data and reference
# ---------------------------------------------------------------------------------------------------------------


def blobs(n_per: int, centers: torch.Tensor, std: float, seed: int, offset: float = 0.0):
    """Gaussian blobs around `centers` (c, d), shuffled: (X (c n_per, d) float32, true labels (c n_per,))."""
    g = torch.Generator().manual_seed(seed)
    c, d = centers.shape
    truth = torch.arange(c).repeat_interleave(n_per)
    X = centers[truth] + std * torch.randn(c * n_per, d, generator=g, dtype=F64) + offset
    perm = torch.randperm(c * n_per, generator=g)
    return X[perm].float(), truth[perm]


def separated_centers(c: int, d: int, seed: int, scale: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(c, d, generator=g, dtype=F64)


def overlapping_mixture(N: int, d: int, seed: int) -> torch.Tensor:
    """Ambiguous data: 8 Gaussian components 2 std apart, so Lloyd needs many steps and the result depends on init."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(8, d, generator=g, dtype=F64)
    return (centers[torch.randint(0, 8, (N,), generator=g)] + torch.randn(N, d, generator=g, dtype=F64)).float()


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Labels a and b define the same partition (equal up to a permutation of cluster ids)."""
    pairs = torch.unique(torch.stack([a, b], dim=1), dim=0)
    return len(pairs) == len(torch.unique(a)) == len(torch.unique(b))


def lloyd_reference(X, init, n_iter: int, weights=None, point_weights=None):
    """Plain float64 numpy Lloyd from explicit initial centroids, with the module's empty-cluster rule; point weights
    p make the update a p-weighted mean (plain mean where a cluster's p sum to 0) and the inertia sum p_i D_i^2.

    Returns (centroids, labels, inertia) after n_iter updates followed by a final assignment.
    """
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(init, dtype=np.float64).copy()
    w = np.ones(X.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    p = np.ones(X.shape[0]) if point_weights is None else np.asarray(point_weights, dtype=np.float64)
    k = C.shape[0]

    def assign(C):
        dist = (((X[:, None, :] - C[None, :, :]) ** 2) * w).sum(-1)  # (N, k), exact differences
        labels = dist.argmin(1)
        return labels, dist[np.arange(len(X)), labels]

    labels, dist = assign(C)
    for _ in range(n_iter):
        counts = np.bincount(labels, minlength=k)
        new = np.zeros_like(C)
        for j in range(k):
            members = labels == j
            if counts[j]:
                mass = p[members].sum()
                new[j] = (p[members, None] * X[members]).sum(0) / mass if mass > 0 else X[members].mean(0)
        empty = np.flatnonzero(counts == 0)
        far = np.argsort(-(p * dist), kind="stable")[: len(empty)]
        new[empty] = X[far]
        C = new
        labels, dist = assign(C)
    return C, labels, (p * dist).sum()


def random_init(X: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return X[torch.randperm(X.shape[0], generator=g)[:k]].clone()


# ---------------------------------------------------------------------------------------------------------------
# recovery, exact cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["k-means++", "greedy-k-means++"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separated_blobs_recovered(init, offset, seed):
    centers = separated_centers(6, 8, seed=10 + seed)
    X, truth = blobs(40, centers, std=1.0, seed=seed, offset=offset)
    res = kmeans(X, 6, init=init, seed=seed)
    assert isinstance(res, KMeansResult)
    assert res.centroids.shape == (6, 8) and res.centroids.dtype == torch.float32
    assert res.labels.shape == (240,) and res.labels.dtype == torch.int64
    assert res.inertia.shape == () and res.n_iter.shape == ()
    assert same_partition(res.labels, truth)
    # centroids are the blob means (within fp32 rounding of values ~ offset)
    for j in range(6):
        members = X[res.labels == j].double()
        torch.testing.assert_close(res.centroids[j].double(), members.mean(0), rtol=1e-5, atol=1e-6 * (1 + offset))
    expected_inertia = sum(((X[res.labels == j].double() - res.centroids[j].double()) ** 2).sum() for j in range(6))
    torch.testing.assert_close(res.inertia, expected_inertia, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_upcast(dtype):
    X, truth = blobs(30, separated_centers(4, 5, seed=3), std=1.0, seed=3)
    res = kmeans(X.to(dtype), 4)
    assert res.centroids.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert same_partition(res.labels, truth)


def test_k_equals_n_is_exact():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 17, 5, generator=g, dtype=torch.float16)
    res = kmeans(X, 17)
    assert torch.equal(res.inertia, torch.zeros(3, dtype=F64))
    assert torch.equal(res.labels, torch.arange(17).expand(3, 17))
    assert torch.equal(res.centroids, X.float())
    assert torch.equal(res.n_iter, torch.zeros(3, dtype=torch.int64))


def test_k_equals_one_is_the_mean():
    X = overlapping_mixture(200, 6, seed=4)
    res = kmeans(X, 1)
    mean = X.double().mean(0)
    torch.testing.assert_close(res.centroids[0].double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.labels, torch.zeros(200, dtype=torch.int64))
    torch.testing.assert_close(res.inertia, ((X.double() - mean) ** 2).sum(), rtol=1e-6, atol=0)


def test_fewer_distinct_points_than_k():
    """Duplicated points: some clusters must stay empty; the result is still a valid zero-inertia clustering."""
    g = torch.Generator().manual_seed(5)
    distinct = torch.randn(3, 4, generator=g)
    X = distinct[torch.randint(0, 3, (40,), generator=g)]
    for init in ["k-means++", "greedy-k-means++", "random"]:
        res = kmeans(X, 6, init=init, n_iter=5)
        assert float(res.inertia) == pytest.approx(0.0, abs=1e-10)
        assert int(res.labels.min()) >= 0 and int(res.labels.max()) < 6
        torch.testing.assert_close(res.centroids[res.labels], X, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Lloyd against the float64 numpy reference
# ---------------------------------------------------------------------------------------------------------------


def point_weights_with_zeros(N: int, seed: int) -> torch.Tensor:
    """Positive weights spread over two decades, a tenth of them exactly 0."""
    g = torch.Generator().manual_seed(seed)
    p = 10.0 ** (2 * torch.rand(N, generator=g) - 1)
    p[torch.randperm(N, generator=g)[: N // 10]] = 0.0
    return p


@pytest.mark.parametrize("n_iter", [0, 1, 3, 10, 30])
@pytest.mark.parametrize("weighted", [False, True, "points", "both"])
def test_matches_numpy_lloyd_from_same_init(n_iter, weighted):
    X = overlapping_mixture(400, 12, seed=6)
    init = random_init(X, 7, seed=6)
    g = torch.Generator().manual_seed(7)
    w = torch.rand(12, generator=g) * 4 if weighted in (True, "both") else None
    pw = point_weights_with_zeros(400, seed=7) if weighted in ("points", "both") else None
    res = kmeans(X, 7, init=init, n_iter=n_iter, tol=0.0, weights=w, point_weights=pw)
    C_ref, labels_ref, inertia_ref = lloyd_reference(X.numpy(), init.numpy(), n_iter, None if w is None else w.numpy(),
                                                     None if pw is None else pw.numpy())  # fmt: skip
    np.testing.assert_array_equal(res.labels.numpy(), labels_ref)
    np.testing.assert_allclose(res.centroids.double().numpy(), C_ref, rtol=1e-5, atol=1e-5)
    assert float(res.inertia) == pytest.approx(inertia_ref, rel=1e-5)
    assert int(res.n_iter) <= n_iter


def test_float64_matches_reference_tightly():
    X = overlapping_mixture(300, 8, seed=8).double()
    init = random_init(X, 5, seed=8)
    res = kmeans(X, 5, init=init, n_iter=20, tol=0.0)
    C_ref, labels_ref, inertia_ref = lloyd_reference(X.numpy(), init.numpy(), 20)
    np.testing.assert_array_equal(res.labels.numpy(), labels_ref)
    np.testing.assert_allclose(res.centroids.numpy(), C_ref, rtol=1e-12, atol=1e-12)
    assert float(res.inertia) == pytest.approx(inertia_ref, rel=1e-12)


def test_reference_needs_many_iterations():
    """Guard for the test above: on this data Lloyd is still moving after 10 steps (otherwise the comparison at
    n_iter=30 would only re-check a fixed point)."""
    X = overlapping_mixture(400, 12, seed=6)
    init = random_init(X, 7, seed=6)
    _, labels10, _ = lloyd_reference(X.numpy(), init.numpy(), 3)
    _, labels30, _ = lloyd_reference(X.numpy(), init.numpy(), 30)
    assert (labels10 != labels30).sum() > 0


@pytest.mark.parametrize("weighted", [False, True, "points"])
def test_inertia_never_increases(weighted):
    X = overlapping_mixture(500, 10, seed=9)
    g = torch.Generator().manual_seed(9)
    w = torch.rand(10, generator=g) + 0.1 if weighted is True else None
    pw = point_weights_with_zeros(500, seed=9) if weighted == "points" else None
    init = kmeans(X, 9, n_iter=0, weights=w, point_weights=pw, seed=3).centroids  # k-means++ start, reused
    history = [float(kmeans(X, 9, init=init, n_iter=t, tol=0.0, weights=w, point_weights=pw).inertia)
               for t in range(16)]  # fmt: skip
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-6), history
    assert history[-1] < 0.95 * history[0], history  # it did move


def test_tol_stops_early_and_reports_iterations():
    X = overlapping_mixture(500, 10, seed=10)
    tight = kmeans(X, 9, tol=0.0, n_iter=200)
    loose = kmeans(X, 9, tol=1e-2, n_iter=200)
    assert 1 <= int(loose.n_iter) < int(tight.n_iter) < 200
    capped = kmeans(X, 9, tol=0.0, n_iter=2)
    assert int(capped.n_iter) == 2
    assert float(tight.inertia) <= float(loose.inertia) * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# determinism, batching, chunking
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["k-means++", "greedy-k-means++", "random"])
def test_deterministic_for_a_seed_and_seed_dependent(init):
    X = overlapping_mixture(300, 4, seed=11)
    a = kmeans(X, 12, seed=5, init=init)
    b = kmeans(X, 12, seed=5, init=init)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = kmeans(X, 12, seed=6, init=init)
    assert not torch.equal(a.centroids, c.centroids)
    assert not same_partition(a.labels, c.labels)


def test_init_methods_pick_distinct_points():
    X = overlapping_mixture(100, 3, seed=12)
    for init in ["k-means++", "greedy-k-means++", "random"]:
        C = kmeans(X, 20, n_iter=0, init=init).centroids
        # every initial centroid is a data point (up to the centring round trip), and no point is used twice
        d2 = torch.cdist(C.double(), X.double())
        nearest = d2.argmin(1)
        assert float(d2.min(1).values.max()) < 1e-5
        assert len(torch.unique(nearest)) == 20


def test_greedy_init_is_no_worse_on_average():
    """Greedy k-means++ keeps the best of 2 + ln k candidates per centre: its initial inertia is lower on average."""
    X = overlapping_mixture(400, 6, seed=13)
    plain = [float(kmeans(X, 16, n_iter=0, seed=s).inertia) for s in range(6)]
    greedy = [float(kmeans(X, 16, n_iter=0, seed=s, init="greedy-k-means++").inertia) for s in range(6)]
    assert np.mean(greedy) < np.mean(plain)


@pytest.mark.parametrize("init", ["k-means++", "random", "tensor"])
def test_batched_equals_single(init):
    g = torch.Generator().manual_seed(14)
    X = (
        torch.stack([overlapping_mixture(240, 6, seed=s) for s in (20, 21, 22)])
        * torch.tensor([1.0, 3.0, 0.5])[:, None, None]
    )
    w = torch.rand(3, 6, generator=g) + 0.2
    init_arg = torch.stack([random_init(X[b], 10, seed=b) for b in range(3)]) if init == "tensor" else init
    batched = kmeans(X, 10, weights=w, init=init_arg, tol=1e-2)  # stops before fixed points
    assert batched.centroids.shape == (3, 10, 6) and batched.labels.shape == (3, 240)
    assert batched.inertia.shape == (3,) and batched.n_iter.shape == (3,)
    assert len(set(batched.n_iter.tolist())) > 1  # matrices stopped at different steps: freezing is exercised
    for b in range(3):
        single = kmeans(X[b], 10, weights=w[b], init=init_arg[b] if init == "tensor" else init, tol=1e-2)
        assert torch.equal(batched.labels[b], single.labels)
        assert torch.equal(batched.centroids[b], single.centroids)
        assert torch.equal(batched.inertia[b], single.inertia)
        assert torch.equal(batched.n_iter[b], single.n_iter)


def test_more_leading_dims_and_shared_weights():
    X = torch.stack([overlapping_mixture(60, 5, seed=s) for s in range(6)]).reshape(2, 3, 60, 5)
    w = torch.linspace(0.5, 2.0, 5)
    res = kmeans(X, 4, weights=w)
    assert res.centroids.shape == (2, 3, 4, 5) and res.labels.shape == (2, 3, 60) and res.inertia.shape == (2, 3)
    single = kmeans(X[1, 2], 4, weights=w)
    assert torch.equal(res.labels[1, 2], single.labels)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked_exactly(chunk_size):
    X = torch.stack([overlapping_mixture(200, 9, seed=s) for s in (30, 31)])
    w = torch.rand(9, generator=torch.Generator().manual_seed(3)) + 0.1
    ref = kmeans(X, 11, weights=w, tol=0.0, n_iter=15)
    assert int(ref.n_iter.min()) >= 5  # still moving: the comparison covers several assignments
    res = kmeans(X, 11, weights=w, tol=0.0, n_iter=15, chunk_size=chunk_size)
    for x, y in zip(res, ref):
        assert torch.equal(x, y)


def test_small_block_budget_splits_every_step(monkeypatch):
    """Force every working block (distances, one-hot, final differences) to be split into many pieces."""
    X = overlapping_mixture(300, 9, seed=32)
    ref = kmeans(X, 11, tol=0.0, n_iter=25)
    monkeypatch.setattr(kmeans_module, "_CHUNK_BYTES", 4 * 300 * 3)  # 3 rows of distances, 3 clusters of one-hot
    res = kmeans(X, 11, tol=0.0, n_iter=25)
    for x, y in zip(res, ref):
        assert torch.equal(x, y)


def test_default_chunk_fits_7b_mlp_in_one_block():
    """Documented memory rule: 11008 x 4096 with k = 1024 runs each step as one block of <= 256 MiB."""
    rows = kmeans_module._rows_per_block(1, 1024, 4)
    assert rows >= 11008 and 11008 * 1024 * 4 <= kmeans_module._CHUNK_BYTES
    assert kmeans_module._rows_per_block(8, 1024, 4) == 8192


# ---------------------------------------------------------------------------------------------------------------
# weighted distance
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_assignment_picks_the_centroid_matching_important_features():
    """x = (0, 0); A = (0, 5) matches the important feature 0 exactly, B = (1, 0) is closer in plain distance."""
    X = torch.tensor([[0.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    init = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    plain = kmeans(X, 2, init=init, n_iter=0)
    weighted = kmeans(X, 2, init=init, n_iter=0, weights=torch.tensor([100.0, 0.01]))
    assert plain.labels[0] == 1  # unweighted: |x - B|^2 = 1 < 25
    assert weighted.labels[0] == 0  # weighted: 0.01 x 25 = 0.25 < 100 x 1
    assert float(weighted.inertia) == pytest.approx(0.25, rel=1e-6)


def test_weights_change_which_split_is_found():
    """Feature 0 separates two groups by 2 (small), feature 1 by 20 with noise: unweighted k-means splits on feature 1,
    weighting feature 0 up splits on feature 0, which is the split that matters for the outputs."""
    g = torch.Generator().manual_seed(15)
    N = 200
    f0 = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0) + 0.05 * torch.randn(N, generator=g)
    f1 = torch.where(torch.rand(N, generator=g) < 0.5, -10.0, 10.0) + 0.5 * torch.randn(N, generator=g)
    X = torch.stack([f0, f1], dim=1)
    plain = kmeans(X, 2, seed=1)
    weighted = kmeans(X, 2, seed=1, weights=torch.tensor([1.0, 1e-4]))
    assert same_partition(plain.labels, (f1 > 0).long())
    assert same_partition(weighted.labels, (f0 > 0).long())
    # under the weights, the weighted solution is the better one (the point of weighting)
    w = torch.tensor([1.0, 1e-4], dtype=F64)

    def weighted_inertia(res):
        return float((((X.double() - res.centroids.double()[res.labels]) ** 2) * w).sum())

    assert weighted_inertia(weighted) < 0.1 * weighted_inertia(plain)
    assert float(weighted.inertia) == pytest.approx(weighted_inertia(weighted), rel=1e-6)


def test_weighted_centroids_are_plain_means_even_with_zero_weights():
    X = overlapping_mixture(300, 6, seed=16)
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.0, 3.0])
    res = kmeans(X, 5, weights=w)
    for j in range(5):
        torch.testing.assert_close(res.centroids[j].double(), X[res.labels == j].double().mean(0), rtol=1e-5, atol=1e-6)


def test_unit_weights_equal_no_weights():
    X = overlapping_mixture(300, 6, seed=17)
    a = kmeans(X, 8)
    b = kmeans(X, 8, weights=torch.ones(6))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# empty clusters
# ---------------------------------------------------------------------------------------------------------------


def test_empty_clusters_reseeded_on_farthest_points():
    centers = separated_centers(3, 4, seed=18)
    X, truth = blobs(30, centers, std=1.0, seed=18)
    # centroid 0 sits on a data point; 1 and 2 are far from everything, so every point picks centroid 0
    init = torch.stack([X[0], torch.full((4,), 1e3), torch.full((4,), -1e3)])
    first = kmeans(X, 3, init=init, n_iter=0)
    assert torch.equal(first.labels, torch.zeros(90, dtype=torch.int64))
    one = kmeans(X, 3, init=init, n_iter=1, tol=0.0)
    dist0 = ((X.double() - X[0].double()) ** 2).sum(1)
    farthest = torch.argsort(dist0, descending=True)[:2]  # in order: cluster 1 gets the farthest, 2 the next
    torch.testing.assert_close(one.centroids[1:], X[farthest], rtol=0, atol=1e-4)
    torch.testing.assert_close(one.centroids[0].double(), X.double().mean(0), rtol=1e-5, atol=1e-5)
    C_ref, labels_ref, _ = lloyd_reference(X.numpy(), init.numpy(), 1)
    np.testing.assert_array_equal(one.labels.numpy(), labels_ref)
    assert torch.bincount(one.labels, minlength=3).min() > 0


def test_empty_cluster_reseeding_recovers_blobs():
    """Centroids in blobs A and B and one far away: C's points join A or B and the empty cluster is re-seeded on the
    farthest of them, inside blob C, after which Lloyd separates the three blobs."""
    centers = separated_centers(3, 4, seed=18)
    X, truth = blobs(30, centers, std=1.0, seed=18)
    a, b = (int((truth == j).nonzero()[0]) for j in (0, 1))
    init = torch.stack([X[a], X[b], torch.full((4,), 1e3)])
    assert int(kmeans(X, 3, init=init, n_iter=0).labels.bincount(minlength=3)[2]) == 0
    full = kmeans(X, 3, init=init)
    assert same_partition(full.labels, truth)
    assert int(full.n_iter) >= 2


def test_empty_cluster_reseeding_in_a_batch_is_per_matrix():
    centers = separated_centers(3, 4, seed=19)
    X0, _ = blobs(20, centers, std=1.0, seed=19)
    X1, _ = blobs(20, centers, std=1.0, seed=20)
    X = torch.stack([X0, X1])
    init = torch.stack(
        [
            torch.stack([X0[0], torch.full((4,), 1e3), torch.full((4,), -1e3)]),  # two empty clusters
            random_init(X1, 3, seed=0),  # none empty
        ]
    )
    batched = kmeans(X, 3, init=init, n_iter=2, tol=0.0)
    for b in range(2):
        single = kmeans(X[b], 3, init=init[b], n_iter=2, tol=0.0)
        assert torch.equal(batched.centroids[b], single.centroids)
        assert torch.equal(batched.labels[b], single.labels)


# ---------------------------------------------------------------------------------------------------------------
# kmeans_many
# ---------------------------------------------------------------------------------------------------------------


def test_kmeans_many_matches_single_calls_in_input_order():
    mats = [
        overlapping_mixture(120, 5, seed=40),
        overlapping_mixture(90, 7, seed=41),
        overlapping_mixture(120, 5, seed=42),
        overlapping_mixture(120, 5, seed=43).double(),
    ]
    ks = [6, 4, 6, 6]
    g = torch.Generator().manual_seed(44)
    weights = [torch.rand(5, generator=g) + 0.1, None, None, torch.rand(5, generator=g, dtype=F64) + 0.1]
    results = kmeans_many(mats, ks, weights=weights, max_batch_bytes=120 * 5 * 4)  # one matrix per batch
    grouped = kmeans_many(mats, ks, weights=weights)
    for X, k, w, r1, r2 in zip(mats, ks, weights, results, grouped):
        single = kmeans(X, k, weights=w)
        for a, b, c in zip(single, r1, r2):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_kmeans_many_mapping_and_per_matrix_k():
    mats = {"q": overlapping_mixture(80, 4, seed=45), "k": overlapping_mixture(80, 4, seed=46)}
    out = kmeans_many(mats, {"q": 3, "k": 5}, progress=False)
    assert list(out) == ["q", "k"]
    assert out["q"].centroids.shape == (3, 4) and out["k"].centroids.shape == (5, 4)
    assert torch.equal(out["k"].labels, kmeans(mats["k"], 5).labels)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_nan_and_inf_name_the_index():
    X = torch.randn(10, 4)
    X[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"kmeans: X contains NaN/Inf .*first at index \(3, 2\)"):
        kmeans(X, 2)
    Xb = torch.randn(2, 10, 4)
    Xb[1, 7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"first at index \(1, 7, 0\)"):
        kmeans(Xb, 2)
    with pytest.raises(ValueError, match=r"kmeans_many: matrix 1: X contains NaN/Inf"):
        kmeans_many([torch.randn(10, 4), X], 2)
    with pytest.raises(ValueError, match=r"kmeans_many: matrix 'up': X contains NaN/Inf"):
        kmeans_many({"down": torch.randn(10, 4), "up": X}, 2)


@pytest.mark.parametrize(
    "k, error, pattern",
    [
        (0, ValueError, r"kmeans: k=0 must be >= 1"),
        (-3, ValueError, r"k=-3 must be >= 1"),
        (11, ValueError, r"kmeans: k=11 must be <= N=10, the number of points \(rows of X.shape=\(10, 4\)\)"),
        (2.0, TypeError, r"k=2.0 must be an int"),
        (True, TypeError, r"k=True must be an int"),
    ],
)
def test_bad_k(k, error, pattern):
    with pytest.raises(error, match=pattern):
        kmeans(torch.randn(10, 4), k)


def test_bad_k_in_kmeans_many_names_the_matrix():
    with pytest.raises(ValueError, match=r"kmeans_many: matrix 1: k=20 must be <= N=10"):
        kmeans_many([torch.randn(30, 4), torch.randn(10, 4)], 20)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(n_iter=-1), ValueError, r"n_iter=-1 must be >= 0"),
        (dict(tol=-1e-3), ValueError, r"tol=-0.001 must be a finite float >= 0"),
        (dict(tol=float("nan")), ValueError, r"tol=nan"),
        (dict(seed=1.5), TypeError, r"seed=1.5 must be an int"),
        (dict(chunk_size=0), ValueError, r"chunk_size=0 must be >= 1"),
        (dict(init="kmeans++"), ValueError, r"init='kmeans\+\+' must be one of"),
        (dict(init=[0, 1]), TypeError, r"init must be one of .* or a tensor"),
        (dict(init=torch.zeros(3, 4)), ValueError, r"init.shape=\(3, 4\) must be \(2, 4\)"),
        (dict(init=torch.tensor([[0.0] * 4, [float("nan")] * 4])), ValueError, r"init contains NaN/Inf"),
        (dict(weights=torch.ones(5)), ValueError, r"weights.shape=\(5,\) must be \(4,\)"),
        (dict(weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, r"weights has negative entries"),
        (dict(weights=torch.zeros(4)), ValueError, r"weights are all zero"),
        (dict(weights=torch.tensor([1.0, float("inf"), 1.0, 1.0])), ValueError, r"weights contains NaN/Inf"),
        (dict(weights=torch.ones(4, dtype=torch.int64)), TypeError, r"weights must be None or a floating"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kmeans(torch.randn(10, 4), 2, **kwargs)


@pytest.mark.parametrize(
    "X, error, pattern",
    [
        ([[1.0, 2.0]], TypeError, r"X must be a torch.Tensor, got list"),
        (torch.ones(10, 4, dtype=torch.int32), TypeError, r"X.dtype=torch.int32 must be a real floating dtype"),
        (torch.ones(10), ValueError, r"X.shape=\(10,\) must be \(..., N, d\)"),
        (torch.ones(0, 4), ValueError, r"has an empty dimension"),
    ],
)
def test_bad_points(X, error, pattern):
    with pytest.raises(error, match=pattern):
        kmeans(X, 1)


def test_bad_init_is_reported_for_k_equals_n_and_batches():
    with pytest.raises(ValueError, match=r"init.shape=\(3, 4\) must be \(10, 4\)"):
        kmeans(torch.randn(10, 4), 10, init=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"init.shape=\(3, 2, 4\) must be \(2, 4\) or \(2, 2, 4\)"):
        kmeans(torch.randn(2, 10, 4), 2, init=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match=r"weights.shape=\(3, 4\) must be \(4,\) or \(2, 4\)"):
        kmeans(torch.randn(2, 10, 4), 2, weights=torch.ones(3, 4))


def test_does_not_track_gradients_or_modify_inputs():
    X = overlapping_mixture(50, 4, seed=60).requires_grad_()
    before = X.detach().clone()
    for k in (3, 50):
        res = kmeans(X, k)
        assert not res.centroids.requires_grad
        res.centroids.add_(1.0)  # results never alias X
        assert torch.equal(X.detach(), before)


def test_kmeans_many_bad_containers():
    with pytest.raises(TypeError, match=r"matrices must be a sequence or a mapping"):
        kmeans_many(torch.randn(3, 10, 4), 2)
    with pytest.raises(ValueError, match=r"got 1 entries of k for 2 matrices"):
        kmeans_many([torch.randn(10, 4)] * 2, [2])
    with pytest.raises(TypeError, match=r"weights must be None or one entry per matrix"):
        kmeans_many([torch.randn(10, 4)] * 2, 2, weights=torch.ones(4))
    with pytest.raises(ValueError, match=r"kmeans_many: matrix 0: weights.shape=\(3,\) must be \(4,\)"):
        kmeans_many([torch.randn(10, 4)], 2, weights=[torch.ones(3)])
    with pytest.raises(TypeError, match=r"for init tensors call kmeans"):
        kmeans_many([torch.randn(10, 4)], 2, init=torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------------
# TF32 guard and GPU
# ---------------------------------------------------------------------------------------------------------------


def test_ieee_guard_sets_and_restores_cuda_matmul_precision():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy allow_tf32 flag")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with kmeans_module._ieee_fp32(torch.device("cuda")):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


@requires_gpu
def test_cuda_matches_cpu_labels_and_is_deterministic():
    X = overlapping_mixture(2000, 32, seed=50)
    init = random_init(X, 16, seed=50)
    cpu = kmeans(X, 16, init=init, n_iter=20, tol=0.0)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the guard must override it
    try:
        gpu = kmeans(X.cuda(), 16, init=init.cuda(), n_iter=20, tol=0.0)
        again = kmeans(X.cuda(), 16, init=init.cuda(), n_iter=20, tol=0.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    torch.testing.assert_close(gpu.centroids.cpu(), cpu.centroids, rtol=1e-5, atol=1e-5)
    for a, b in zip(gpu, again):
        assert torch.equal(a, b)
    seeded = [kmeans(X.cuda(), 16, seed=3) for _ in range(2)]
    assert torch.equal(seeded[0].centroids, seeded[1].centroids)


# ---------------------------------------------------------------------------------------------------------------
# per-point weights
# ---------------------------------------------------------------------------------------------------------------


def test_integer_point_weights_equal_repeated_points():
    """Weighing a point by an integer c is the same objective as repeating it c times: same partition of the
    original points, same centroids (to rounding) and inertia, from the same initial centroids."""
    X = overlapping_mixture(200, 6, seed=11)
    g = torch.Generator().manual_seed(11)
    counts = torch.randint(1, 4, (200,), generator=g)
    init = random_init(X, 5, seed=11)
    weighted = kmeans(X, 5, init=init, n_iter=20, tol=0.0, point_weights=counts.float())
    repeated = kmeans(X.repeat_interleave(counts, dim=0), 5, init=init, n_iter=20, tol=0.0)
    first = torch.cumsum(counts, 0) - counts  # index of each original point among the repeats
    assert torch.equal(weighted.labels, repeated.labels[first])
    torch.testing.assert_close(weighted.centroids, repeated.centroids, rtol=1e-5, atol=1e-5)
    assert float(weighted.inertia) == pytest.approx(float(repeated.inertia), rel=1e-5)


def test_a_heavy_point_pulls_its_centroid_and_zero_weight_points_are_never_seeds():
    X, _ = blobs(50, separated_centers(3, 4, seed=12), std=1.0, seed=12)
    pw = torch.ones(150)
    pw[7] = 1e6
    res = kmeans(X, 3, point_weights=pw, seed=0)
    torch.testing.assert_close(res.centroids[res.labels[7]], X[7], rtol=0, atol=1e-3)
    only = torch.zeros(150)
    only[[3, 60, 120]] = 1.0  # k-means++ with p can only draw the three weighted points
    seeds = kmeans(X, 3, point_weights=only, n_iter=0, seed=5).centroids
    assert sorted(int((X == c).all(-1).nonzero()[0]) for c in seeds) == [3, 60, 120]


def test_point_weights_in_batches_and_kmeans_many_equal_single_calls():
    mats = [overlapping_mixture(120, 5, seed=s) for s in (13, 14, 15)]
    pws = [point_weights_with_zeros(120, seed=s) for s in (13, 14)] + [None]
    singles = [kmeans(X, 4, point_weights=p, seed=2) for X, p in zip(mats, pws)]
    many = kmeans_many(mats, 4, point_weights=pws, seed=2)
    for a, b in zip(singles, many):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
        assert float(a.inertia) == float(b.inertia)


@pytest.mark.parametrize(
    ("pw", "error", "pattern"),
    [(torch.ones(9), ValueError, "point_weights.shape"), (-torch.ones(10), ValueError, "negative"),
     (torch.zeros(10), ValueError, "all zero"), (torch.full((10,), float("nan")), ValueError, "NaN|finite"),
     (torch.ones(10, dtype=torch.int64), TypeError, "floating")],
)  # fmt: skip
def test_bad_point_weights(pw, error, pattern):
    with pytest.raises(error, match=pattern):
        kmeans(torch.randn(10, 3), 2, point_weights=pw)
