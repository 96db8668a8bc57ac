"""ReID retrieval metrics (mAP, CMC) and the batch-hard triplet loss, checked against brute-force references."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from lightning_effnets.metrics import ReIDMetric, reid_retrieval_scores
from lightning_effnets.tasks.reid import batch_hard_triplet_loss


def brute_force(dist, q_ids, g_ids, q_cams, g_cams, max_rank=10, junk_id=-1):
    """One query at a time, straight from the protocol: drop same-id-same-camera and junk gallery images,
    rank the rest by distance, AP from scikit-learn, CMC from the first correct match."""
    aps, cmc, valid = [], np.zeros(max_rank), 0
    for i in range(dist.shape[0]):
        if q_ids[i] == junk_id:
            continue
        keep = [j for j in range(dist.shape[1])
                if not (g_ids[j] == q_ids[i] and g_cams[j] == q_cams[i]) and g_ids[j] != junk_id]
        relevant = np.array([g_ids[j] == q_ids[i] for j in keep])
        if not relevant.any():
            continue
        valid += 1
        aps.append(average_precision_score(relevant, -dist[i, keep]))
        ranked = sorted(keep, key=lambda j: dist[i, j])
        first = next(r for r, j in enumerate(ranked) if g_ids[j] == q_ids[i])
        cmc[first:] += 1
    return float(np.mean(aps)), cmc / valid, valid


def random_problem(seed, num_query=23, num_gallery=71, num_ids=9, num_cams=4):
    rng = np.random.default_rng(seed)
    q_ids = rng.integers(1, num_ids, num_query)
    g_ids = rng.integers(-1, num_ids, num_gallery)  # includes junk (-1) and distractors (0)
    q_cams = rng.integers(0, num_cams, num_query)
    g_cams = rng.integers(0, num_cams, num_gallery)
    dist = rng.random((num_query, num_gallery))
    return dist, q_ids, g_ids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scores_match_brute_force(seed):
    dist, q_ids, g_ids, q_cams, g_cams = random_problem(seed)
    expected_map, expected_cmc, expected_valid = brute_force(dist, q_ids, g_ids, q_cams, g_cams)
    t = torch.as_tensor
    scores = reid_retrieval_scores(t(dist, dtype=torch.float64), t(q_ids), t(g_ids), t(q_cams), t(g_cams),
                                   max_rank=10, chunk_size=5)
    assert scores.num_valid_queries == expected_valid
    assert float(scores.mAP) == pytest.approx(expected_map, abs=1e-6)
    np.testing.assert_allclose(scores.cmc.numpy(), expected_cmc, atol=1e-6)


def test_hand_computed_example():
    # query: person 1, camera 0. Gallery sorted by distance:
    #   person 1 cam 0 (same camera: excluded), person 2 (miss), junk (-1: ignored), person 1 cam 1 (hit at rank 2),
    #   distractor 0 (miss), person 1 cam 2 (hit at rank 4)
    g_ids = torch.tensor([1, 2, -1, 1, 0, 1])
    g_cams = torch.tensor([0, 1, 1, 1, 2, 2])
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    scores = reid_retrieval_scores(dist, torch.tensor([1]), g_ids, torch.tensor([0]), g_cams, max_rank=5)
    assert float(scores.mAP) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert scores.cmc.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_metric_module_matches_brute_force_with_groups_and_duplicates():
    rng = np.random.default_rng(5)
    n, dim = 120, 6
    pids = rng.integers(1, 12, n)
    cams = rng.integers(0, 5, n)
    query = rng.random(n) < 0.3
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    metric = ReIDMetric(ranks=(1, 5, 10), distance="euclidean", camera_groups={"seen": [0, 1, 2], "held_out": [3, 4],
                                                                             "absent": [9]})
    t = torch.as_tensor
    for start in range(0, n, 32):  # several updates, like batches
        s = slice(start, start + 32)
        metric.update(t(feats[s]), t(pids[s]), t(cams[s]), t(query[s]), torch.arange(n)[s])
    # a padding DistributedSampler evaluates the first samples twice: they must count once
    metric.update(t(feats[:10]), t(pids[:10]), t(cams[:10]), t(query[:10]), torch.arange(10))
    result = metric.compute()

    def expected(mask):
        qi, gi = np.flatnonzero(mask & query), np.flatnonzero(mask & ~query)
        dist = np.linalg.norm(feats[qi, None] - feats[None, gi], axis=2)
        return brute_force(dist, pids[qi], pids[gi], cams[qi], cams[gi])

    for prefix, mask in (("", np.ones(n, bool)), ("seen/", cams <= 2), ("held_out/", cams >= 3)):
        mAP, cmc, valid = expected(mask)
        assert float(result[f"{prefix}mAP"]) == pytest.approx(mAP, abs=1e-5), prefix
        for r in (1, 5, 10):
            assert float(result[f"{prefix}rank{r}"]) == pytest.approx(cmc[r - 1], abs=1e-6), prefix
        assert int(result[f"{prefix}num_queries"]) == valid
    assert not any(k.startswith("absent/") for k in result)  # no image of camera 9: group left out


def test_cosine_distance_ranks_like_normalised_euclidean():
    rng = np.random.default_rng(1)
    feats = torch.as_tensor(rng.standard_normal((40, 5)), dtype=torch.float32)
    pids, cams = torch.as_tensor(rng.integers(1, 6, 40)), torch.as_tensor(rng.integers(0, 3, 40))
    query = torch.arange(40) < 12
    cos, euc = ReIDMetric(distance="cosine"), ReIDMetric(distance="euclidean")
    cos.update(feats, pids, cams, query)
    euc.update(torch.nn.functional.normalize(feats, dim=1), pids, cams, query)
    assert float(cos.compute()["mAP"]) == pytest.approx(float(euc.compute()["mAP"]), abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*compute.*called before.*update")
def test_clear_errors():
    feats, ids, cams = torch.randn(4, 3), torch.tensor([1, 1, 2, 2]), torch.tensor([0, 1, 0, 1])
    metric = ReIDMetric()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    metric.update(feats, ids, cams, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty gallery"):
        metric.compute()
    metric = ReIDMetric()
    metric.update(feats, ids, cams, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no query"):
        metric.compute()
    metric = ReIDMetric()  # queries only match themselves in the same camera: nothing to find
    metric.update(feats, torch.tensor([1, 1, 2, 2]), torch.tensor([0, 0, 1, 1]), torch.tensor([True, False] * 2))
    with pytest.raises(ValueError, match="none of the 2 queries has a relevant gallery image"):
        metric.compute()
    metric = ReIDMetric(camera_groups={"one_camera": [1]})
    metric.update(torch.randn(6, 3), torch.tensor([1, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 0, 1, 1]),
                  torch.tensor([True, True, False, True, True, False]))
    with pytest.raises(ValueError, match="camera group 'one_camera'.*at least two cameras"):
        metric.compute()
    with pytest.raises(ValueError, match="shape"):
        ReIDMetric().update(torch.randn(4, 3), torch.zeros(3), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="indices"):
        metric = ReIDMetric()
        metric.update(feats, ids, cams, torch.zeros(4, dtype=torch.bool), torch.arange(4))
        metric.update(feats, ids, cams, torch.zeros(4, dtype=torch.bool))


def brute_force_triplet(features, labels, margin):
    losses = []
    for a in range(len(labels)):
        pos = [float(torch.dist(features[a], features[p])) for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [float(torch.dist(features[a], features[n])) for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            gap = max(pos) - min(neg)
            losses.append(np.log1p(np.exp(gap)) if margin is None else max(gap + margin, 0.0))
    return float(np.mean(losses))


@pytest.mark.parametrize("margin", [0.3, 5.0, None])
def test_batch_hard_triplet_loss_matches_brute_force(margin):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(14, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5])  # identity 3 has no positive: not an anchor
    loss = batch_hard_triplet_loss(features, labels, margin)
    assert loss.item() == pytest.approx(brute_force_triplet(features.detach(), labels, margin), rel=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    # identical features (zero distances) keep finite gradients
    same = torch.zeros(4, 3, requires_grad=True)
    batch_hard_triplet_loss(same, torch.tensor([0, 0, 1, 1]), 0.3).backward()
    assert torch.isfinite(same.grad).all()
    # a batch of one identity has no negatives: zero loss, still differentiable
    single = torch.randn(3, 2, requires_grad=True)
    loss = batch_hard_triplet_loss(single, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
