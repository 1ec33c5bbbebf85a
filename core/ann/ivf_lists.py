"""IVF internals the rebuild and serving share: per-list sums of the stored vectors, the centroid
refit that uses them, and exact rescoring of hits from compressed codes."""

from __future__ import annotations

import faiss
import numpy as np


def list_sums(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """Per inverted list of an IVF index with float32 or fp16 codes of the vectors themselves (not
    residuals): the sum of its vectors (float64) and their count."""
    ivf = faiss.extract_index_ivf(index)
    dtype = {4 * ivf.d: np.float32, 2 * ivf.d: np.float16}.get(ivf.code_size)
    if dtype is None or (dtype is np.float16 and ivf.by_residual):
        raise ValueError(f"list sums need float32 or fp16 codes of the vectors, not residuals; got {ivf}")
    sums, counts = np.zeros((ivf.nlist, ivf.d)), np.zeros(ivf.nlist, np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), size * ivf.code_size)
            sums[lst] = codes.view(dtype).reshape(size, ivf.d).sum(0, dtype=np.float64)
            counts[lst] = size
    return sums, counts


def refit_centroids(indexes: list[faiss.Index], sums: np.ndarray, counts: np.ndarray) -> None:
    """Move every list's centroid to the (unit-norm) mean of the vectors the add put in it, in each of
    `indexes` (shards of one trained index). The vectors stay where they are: only which lists a query
    probes changes, never the scores it gets, and the recall gate measures the result. One full-data
    centroid step gives back what a k-means cut short on a sample loses (core.ann.index.prior_spec)."""
    q = faiss.downcast_index(faiss.extract_index_ivf(indexes[0]).quantizer)
    cents = q.reconstruct_n(0, q.ntotal)
    norms = np.linalg.norm(sums, axis=1)
    full = (counts > 0) & (norms > 0)
    cents[full] = (sums[full] / norms[full, None]).astype(np.float32)  # spherical, as faiss trains IP
    for index in indexes:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        quantizer.reset()
        quantizer.add(cents)


def exact_scores(xq: np.ndarray, I: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The exact float32 inner products of the hits I (Q, k) from the id-sorted table (ids, vectors),
    aligned with I (-inf where I is -1)."""
    rows = np.minimum(np.searchsorted(ids, I.clip(min=0)), len(ids) - 1)
    true = np.einsum(
        "qd,qkd->qk", np.asarray(xq, np.float32), np.asarray(vectors[rows.ravel()]).reshape(*rows.shape, -1)
    )
    return np.where(I >= 0, true, -np.inf).astype(np.float32)


def rescore(xq: np.ndarray, D: np.ndarray, I: np.ndarray, ids: np.ndarray, vectors: np.ndarray):
    """The hits I (Q, k) by their exact scores, best first (-1 ids last, -inf): an index with
    compressed codes proposes, the table scores."""
    return by_exact(I, exact_scores(xq, I, ids, vectors))


def by_exact(I: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) ordered by the exact scores; ties keep the proposal's order."""
    order = np.argsort(-exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, 1), np.take_along_axis(I, order, 1)


def merge_proposals(results: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int):
    """(scores, ids) (Q, k) over shards with disjoint ids, each (ids, exact scores, index scores): the
    top-k by the index's own scores, as ONE index over every shard would propose them, then ordered by
    their exact scores, as that index's hits are rescored. Rescoring each shard's list before merging
    would rank more candidates exactly than the merged index does, so the answers would differ."""
    I = np.concatenate([r[0] for r in results], axis=1)
    E = np.concatenate([r[1] for r in results], axis=1)
    D = np.where(I >= 0, np.concatenate([r[2] for r in results], axis=1), -np.inf)
    top = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return by_exact(np.take_along_axis(I, top, 1), np.take_along_axis(E, top, 1))
