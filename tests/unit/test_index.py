import numpy as np
import pytest

from core import index as ann


def _data(n=20_000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6)).astype(np.float32) @ rng.standard_normal((6, d)).astype(np.float32)
    xb = z + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, 300, replace=False)] + 0.2 * rng.standard_normal((300, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # sparse, unordered ids
    return xb, ids, xq


def test_auto_choice_is_flat_for_small_and_ivf_for_large_catalogs():
    assert ann.choose_spec(9_742, 64).kind == "flat"
    big = ann.choose_spec(1_000_000, 64)
    assert big.factory == "IVF4096,Flat" and big.train_sample == 64 * 4096


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_tuned_index_reaches_target_recall_against_exact_search(kind):
    ann.configure(2)
    xb, ids, xq = _data()
    spec = ann.choose_spec(len(xb), xb.shape[1], kind)
    idx, _ = ann.build(spec, xb, ids)
    q = ann.tune(idx, spec, xb, ids, xq[:150], xq[150:], k=10, target=0.95)
    assert q["recall_at_k"] >= 0.95
    # Independent oracle: brute force in numpy, tie-tolerant.
    _, found = ann.search(idx, spec, q["params"], xq[150:], 10)
    exact = np.argsort(-(xq[150:] @ xb.T), axis=1)[:, :10]
    kth = np.take_along_axis(xq[150:] @ xb.T, exact[:, 9:10], axis=1)
    row = {int(i): r for r, i in enumerate(ids)}
    true = np.array([[xq[150 + qi] @ xb[row[int(i)]] for i in found[qi]] for qi in range(len(found))])
    assert (true >= kth - 1e-5).mean() == pytest.approx(q["recall_at_k"], abs=1e-3)
    assert set(found.ravel()) <= set(ids.tolist())


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
