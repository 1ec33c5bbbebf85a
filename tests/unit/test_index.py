import dataclasses

import faiss
import numpy as np
import pytest

from core.ann import index as ann
from core.ann import ivf_lists


def _data(n=20_000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6)).astype(np.float32) @ rng.standard_normal((6, d)).astype(np.float32)
    xb = z + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, 300, replace=False)] + 0.2 * rng.standard_normal((300, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # sparse, unordered ids
    return xb, ids, xq


def test_auto_candidates_by_catalog_size_and_ivf_lists_scale_with_sqrt_n():
    # 1M: HNSW32 vs IVF at 2 and 4*sqrt(n) lists, measured (which wins depends on the machine)
    assert [s.factory for s in ann.auto_specs(1_000_000, 64)] == [
        "IDMap2,HNSW32,Flat",
        "IVF2048,Flat",
        "IVF4096,Flat",
    ]
    # HNSW's graph build took 44 min of a 46 min rebuild at 10M items: IVF alone above 2M
    [big] = ann.auto_specs(10_000_000, 64)
    assert big.factory == "IVF8192,Flat" and big.train_sample == 64 * 8192
    ivf = ann.choose_spec(1_000_000, 64, "ivf")
    assert ivf.factory == "IVF4096,Flat" and ivf.train_sample == 64 * 4096
    # the prior up to 2M: 1.5x the lists in fp16 codes for the same k-means cost (points x lists x
    # iterations), refit
    prior = ann.prior_spec(1_000_000, 64)
    got = (prior.factory, prior.train_sample, prior.kmeans_iters, prior.refit)
    assert got == ("IVF6144,SQfp16", 48 * 6144, 6, True)
    assert abs(prior.train_sample * 6144 * 6 / (ivf.train_sample * 4096 * ivf.kmeans_iters) - 1) < 0.02
    assert ann.approximate(prior) and not ann.approximate(ivf)
    assert ann.index_bytes(prior, 1000, 64) == 1000 * (2 * 64 + 8)
    assert ann.prior_spec(10_000_000, 64) == big
    with pytest.raises(ValueError, match="auto_specs"):
        ann.choose_spec(1_000_000, 64, "auto")


def test_auto_between_the_size_limits_measures_hnsw_against_ivf_and_above_takes_ivf_alone(monkeypatch):
    ann.configure(2)
    xb, ids, xq = _data()
    # the 200k..2M regime, scaled down to this 20k-item catalog
    monkeypatch.setattr(ann, "MEASURED_CHOICE_MAX_ITEMS", 10_000)
    _, spec, q, _ = ann.build_tuned(xb, ids, xq[:150], xq[150:], k=10, target=0.95, kind="auto")
    assert q["selection"] == "measured"
    assert [c["factory"] for c in q["candidates"]] == ["IDMap2,HNSW32,Flat", "IVF256,Flat", "IVF512,Flat"]
    timed = [c for c in q["candidates"] if c["tuning_qps"] is not None]
    assert spec.factory == max(timed, key=lambda c: c["tuning_qps"])["factory"]
    assert q["recall_at_k"] >= 0.95
    # above HNSW_MAX_ITEMS: IVF-Flat at ~2*sqrt(n) lists, nothing to measure
    monkeypatch.setattr(ann, "HNSW_MAX_ITEMS", 10_000)
    _, spec, q, _ = ann.build_tuned(xb, ids, xq[:150], xq[150:], k=10, target=0.95, kind="auto")
    assert q["selection"] == "default" and spec.factory == "IVF256,Flat"
    assert [c["tuning_qps"] for c in q["candidates"]] == [None]


def test_search_grids_step_by_at_most_1_5x():
    # a coarse grid makes tuning overshoot the target (nprobe 16 -> 32 cost 40% of the QPS at 1M)
    for grid in (ann.NPROBES, ann.EF_SEARCH):
        assert all(b / a <= 1.5 for a, b in zip(grid[3:], grid[4:], strict=False))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_tuned_index_reaches_target_recall_against_exact_search(kind):
    ann.configure(2)
    xb, ids, xq = _data()
    idx, spec, q, _ = ann.build_tuned(xb, ids, xq[:150], xq[150:], k=10, target=0.95, kind=kind)
    assert spec.kind == kind and q["selection"] == "requested"
    assert q["recall_at_k"] >= 0.95
    # Independent oracle: brute force in numpy, tie-tolerant.
    _, found = ann.search(idx, spec, q["params"], xq[150:], 10)
    exact = np.argsort(-(xq[150:] @ xb.T), axis=1)[:, :10]
    kth = np.take_along_axis(xq[150:] @ xb.T, exact[:, 9:10], axis=1)
    row = {int(i): r for r, i in enumerate(ids)}
    true = np.array([[xq[150 + qi] @ xb[row[int(i)]] for i in found[qi]] for qi in range(len(found))])
    assert (true >= kth - 1e-5).mean() == pytest.approx(q["recall_at_k"], abs=1e-3)
    assert set(found.ravel()) <= set(ids.tolist())


def test_auto_measures_every_family_and_keeps_the_fastest_at_target():
    ann.configure(2)
    xb, ids, xq = _data()
    idx, spec, q, _ = ann.build_tuned(xb, ids, xq[:150], xq[150:], k=10, target=0.95, kind="auto")
    cands = {c["factory"]: c for c in q["candidates"]}
    specs = ann.auto_specs(len(xb), 32)
    assert [s.factory for s in specs] == list(cands)
    assert sorted(s.kind for s in specs) == ["flat", "hnsw", "ivf", "ivf", "ivf"]
    at_target = [c for c in cands.values() if c["reached_target"]]
    assert at_target and all(c["tuning_recall"] >= 0.95 for c in at_target)
    assert cands[spec.factory]["tuning_qps"] == max(c["tuning_qps"] for c in at_target)
    # one that missed the target is not timed: it cannot win against one that reached it
    assert all(c["tuning_qps"] is None for c in cands.values() if not c["reached_target"])
    grid = ann.candidate_params(spec)  # the held-out check may step up from the tuning pick, never down
    assert q["selection"] == "measured" and grid.index(q["params"]) >= grid.index(
        cands[spec.factory]["params"]
    )
    assert idx.ntotal == len(xb)


def test_a_family_that_misses_the_target_never_wins_on_speed():
    ann.configure(2)
    xb, ids, xq = _data(n=5_000)
    _, spec, q, _ = ann.build_tuned(xb, ids, xq[:150], xq[150:], k=10, target=1.0, kind="auto")
    chosen = next(c for c in q["candidates"] if c["factory"] == spec.factory)
    assert chosen["tuning_recall"] == 1.0  # the cheap settings that miss are faster, and lose


def test_the_setting_must_reach_the_target_on_the_held_out_queries_too():
    # In CI the cheapest setting at 0.9508 on the tuning queries gave 0.9495 held-out and failed the
    # build. Here the tuning queries are easy (catalog vectors themselves) and the held-out ones hard,
    # so the tuning choice misses held-out and the search must step up instead of failing.
    ann.configure(2)
    xb, ids, xq = _data()
    easy = xb[:150] + 0.01 * np.random.default_rng(1).standard_normal((150, xb.shape[1])).astype(np.float32)
    easy /= np.linalg.norm(easy, axis=1, keepdims=True)
    _, spec, q, _ = ann.build_tuned(xb, ids, easy, xq[150:], k=10, target=0.95, kind="ivf")
    grid = ann.candidate_params(spec)
    tuned, chosen = q["tuning_sweep"][-1], q["params"]
    assert q["tuning_reached_target"] and tuned["recall"] >= 0.95
    steps = q["holdout_steps"]
    assert len(steps) > 1 and steps[0]["holdout_lower_95"] < 0.95  # the tuning choice missed held-out
    assert (
        grid.index(chosen) == grid.index({k: v for k, v in tuned.items() if k != "recall"}) + len(steps) - 1
    )
    assert q["recall_at_k"] == steps[-1]["holdout_recall"]
    assert q["recall_lower_95"] == steps[-1]["holdout_lower_95"] >= 0.95
    assert q["recall_ci95"][0] < q["recall_lower_95"] < q["recall_at_k"] <= q["recall_ci95"][1]
    assert all(s["holdout_lower_95"] < 0.95 for s in steps[:-1])  # and it stopped at the first that passed


def _users(xb, n, seed, noise=0.25):
    """Queries as users are: a mixture of two catalog vectors plus noise (never a catalog vector)."""
    rng = np.random.default_rng(seed)
    q = xb[rng.integers(0, len(xb), n)] + xb[rng.integers(0, len(xb), n)]
    q += noise * rng.standard_normal(q.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_the_promised_recall_holds_for_users_the_gate_never_saw_in_19_of_20_builds():
    """20 builds, each with its own seed: tune on 400 queries, gate on 400 disjoint held-out ones, then
    measure the chosen setting on 3,000 fresh users from the same distribution. The gate requires the
    lower end of the held-out interval to reach 0.95; the fresh recall must reach it in >= 19 builds.
    Measured here: 20 of 20, lowest 0.9505, median 0.965 (the held-out mean rule's picks: lowest 0.9503,
    median 0.954; this grid's steps overshoot, so it passed too, with less room)."""
    ann.configure(2)
    passed, by_mean = [], []
    for seed in range(20):
        xb, ids, _ = _data(n=8_000, seed=seed)
        users = _users(xb, 3_800, seed + 100)
        tune, hold, fresh = users[:400], users[400:800], users[800:]
        index, spec, q, _ = ann.build_tuned(xb, ids, tune, hold, k=10, target=0.95, kind="ivf", seed=seed)
        exact = ann.exact_topk(xb, fresh, 10)
        assert q["recall_lower_95"] >= 0.95
        first = next(s for s in q["holdout_steps"] if s["holdout_recall"] >= 0.95)  # the old rule's pick
        for params, out in ((q["params"], passed), ({k: first[k] for k in q["params"]}, by_mean)):
            out.append(
                ann.recall_at_k(xb, ids, fresh, ann.search(index, spec, params, fresh, 10)[1], 10, exact)
            )
    ok = sum(r >= 0.95 for r in passed)
    assert ok >= 19, f"fresh recall {np.round(passed, 4)}; held-out mean rule: {np.round(by_mean, 4)}"


def test_recall_counts_misses_and_invalid_ids():
    xb, ids, xq = _data(n=2_000)
    exact_rows = ann.exact_topk(xb, xq, 10)
    perfect = ids[exact_rows]
    assert ann.recall_at_k(xb, ids, xq, perfect, 10) == 1.0
    half = perfect.copy()
    half[:, 5:] = -1  # faiss' "no result"
    assert ann.recall_at_k(xb, ids, xq, half, 10) == pytest.approx(0.5)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        ann.choose_spec(10, 8, "annoy")


def _list_rows(index, ids):
    """Row numbers (into the build's arrays) of each inverted list's vectors."""
    ivf = faiss.extract_index_ivf(index)
    row_of = {int(i): r for r, i in enumerate(ids)}
    out = []
    for lst in range(ivf.nlist):
        n = ivf.invlists.list_size(lst)
        got = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).copy() if n else np.zeros(0, np.int64)
        out.append(np.array([row_of[int(i)] for i in got], np.int64))
    return out


def test_the_refit_moves_each_centroid_to_its_lists_mean_without_moving_a_vector():
    ann.configure(2)
    xb, ids, xq = _data()
    short = ann.IndexSpec("ivf", "IVF128,Flat", 128 * 8, kmeans_iters=1)  # k-means cut short
    a, _ = ann.build(short, xb, ids)
    b, _ = ann.build(dataclasses.replace(short, refit=True), xb, ids)
    lists = _list_rows(b, ids)
    assert [x.tolist() for x in lists] == [x.tolist() for x in _list_rows(a, ids)]  # the same lists
    cents = faiss.downcast_index(faiss.extract_index_ivf(b).quantizer).reconstruct_n(0, 128)
    for lst, rows in enumerate(lists):
        if len(rows):
            mean = xb[rows].mean(0)
            np.testing.assert_allclose(cents[lst], mean / np.linalg.norm(mean), atol=1e-5)
    # every list probed: the same exact scores either way (the refit never changes a score)
    everything = faiss.SearchParametersIVF(nprobe=128)
    np.testing.assert_allclose(
        a.search(xq, 10, params=everything)[0], b.search(xq, 10, params=everything)[0], atol=1e-6
    )

    # what it is for: each vector is closer to its list's centroid (the spherical k-means objective over
    # ALL vectors, where the cut-short training saw a sample), so probing by centroid finds it sooner
    def objective(index):
        c = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).reconstruct_n(0, 128)
        return sum(float((xb[rows] @ c[lst]).sum()) for lst, rows in enumerate(lists))

    assert objective(b) > objective(a) + 1e-3 * len(xb)


def test_fp16_codes_are_rescored_exactly_from_the_table():
    ann.configure(2)
    xb, ids, xq = _data()
    spec = ann.IndexSpec("ivf", "IVF128,SQfp16", 128 * 40, 6, refit=True)
    index, _ = ann.build(spec, xb, ids)
    assert not faiss.extract_index_ivf(index).by_residual  # codes of the vectors: refit keeps them valid
    D, I = ann.search(index, spec, {"nprobe": 16}, xq, 10)
    order = np.argsort(ids)
    D2, I2 = ivf_lists.rescore(xq, D, I, ids[order], xb[order])
    rows = order[np.searchsorted(ids[order], I2)]
    np.testing.assert_allclose(D2, np.einsum("qd,qkd->qk", xq, xb[rows]), rtol=1e-6)  # float32 scores
    assert not np.array_equal(D, D2)  # the index's own fp16 scores were not exact
    assert (np.diff(D2, axis=1) <= 0).all()  # best first
    assert all(set(a) == set(b) for a, b in zip(I, I2, strict=True))  # the same hits, re-ordered
    pad = np.where(np.arange(10) < 8, I, -1)  # -1 hits (fewer than k found) stay last at -inf
    D3, I3 = ivf_lists.rescore(xq, D, pad, ids[order], xb[order])
    assert (I3[:, 8:] == -1).all() and np.isneginf(D3[:, 8:]).all()
