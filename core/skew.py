"""Version-skew sensitivity check: how much retrieval degrades when the query tower's version differs
from the index's version, for every pair of checkpoints of one family.

cell (q, i) = users embedded by checkpoint q's user tower, items by checkpoint i's item tower.
Recall@K is measured on held-out interactions; overlap@K against the matched-version retrieval (i, i).
A family passes when every off-diagonal cell's relative recall drop stays within a threshold. Results
live in the registry (`skew/<family>/<check_id>.json`) and gate publishing and serving.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core.checkpoint import Checkpoint
from core.fsutil import write_json_atomic
from core.metrics import evaluate_topk
from core.train import item_embeddings, user_embeddings


def _masked_topk(scores: torch.Tensor, users: pa.Table, row_of: dict[int, int], k: int) -> np.ndarray:
    s = scores.clone()
    for r, hist in enumerate(users["history"].to_pylist()):
        if hist:
            s[r, [row_of[int(i)] for i in hist]] = -torch.inf
    return torch.topk(s, k, dim=1).indices.numpy()  # (U, k)


def skew_matrix(
    checkpoints: list[Checkpoint], catalog: pa.Table, users: pa.Table, eval_split: pa.Table, k: int = 10
) -> dict:
    families = {c.family for c in checkpoints}
    if len(families) != 1:
        raise ValueError(
            f"a skew check compares versions of ONE model family; got families {sorted(families)}"
        )
    versions = [c.version for c in checkpoints]
    if len(set(versions)) != len(versions):
        raise ValueError(f"checkpoint versions must be distinct; got {versions}")
    item_ids = catalog["item_id"].to_numpy()
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    items = [item_embeddings(c.model, catalog) for c in checkpoints]  # per version: (N, D)
    queries = [user_embeddings(c.model, users) for c in checkpoints]  # per version: (U, D)
    n = len(checkpoints)
    recall = np.zeros((n, n))
    tops = {}
    for q in range(n):
        for i in range(n):
            scores = queries[q] @ items[i].T  # (U, N)
            recall[q, i] = evaluate_topk(scores, users, item_ids, eval_split, k)["recall"]
            tops[q, i] = _masked_topk(scores, users, row_of, k)
    overlap = np.zeros((n, n))
    for q in range(n):
        for i in range(n):
            a, b = tops[q, i], tops[i, i]
            overlap[q, i] = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    return {
        "family": families.pop(),
        "versions": versions,
        "k": k,
        "recall": recall.tolist(),
        "overlap": overlap.tolist(),
    }


def judge(result: dict, max_relative_drop: float) -> dict:
    """Adds per-pair drops and the verdict: every off-diagonal drop <= max_relative_drop."""
    r = np.array(result["recall"])
    pairs = {}
    for q, vq in enumerate(result["versions"]):
        for i, vi in enumerate(result["versions"]):
            base = r[i, i]
            drop = 0.0 if base <= 0 else float((base - r[q, i]) / base)
            pairs[f"{vq}|{vi}"] = {
                "query": vq,
                "index": vi,
                "recall": float(r[q, i]),
                "relative_drop": round(drop, 4),
                "passed": drop <= max_relative_drop,
            }
    return {
        **result,
        "max_relative_drop": max_relative_drop,
        "pairs": pairs,
        "passed": all(p["passed"] for p in pairs.values()),
    }


def save(registry: Path, result: dict) -> Path:
    check_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    path = Path(registry) / "skew" / result["family"] / f"{check_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path,
        {**result, "check_id": check_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    return path


def load_all(registry: Path, family: str) -> list[dict]:
    d = Path(registry) / "skew" / family
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def passed_check_for(registry: Path, family: str, version: str) -> dict | None:
    """The newest PASSED skew check of `family` that includes `version`, if any."""
    for check in reversed(load_all(registry, family)):
        if check["passed"] and version in check["versions"]:
            return check
    return None


def pair_allowed(registry: Path, family: str, query_version: str, index_version: str) -> bool:
    """Same version always; otherwise only if that exact (query, index) pair passed a skew check."""
    if query_version == index_version:
        return True
    key = f"{query_version}|{index_version}"
    return any(c["pairs"].get(key, {}).get("passed") and c["passed"] for c in load_all(registry, family))


def publish_gate(registry: Path, family: str, version: str, force: bool) -> dict:
    """A family is trusted only after a PASSED skew check that includes this version; otherwise the
    publish is refused unless forced. Returns what the build manifest records about the gate."""
    check = passed_check_for(registry, family, version)
    if check is not None:
        return {"status": "passed", "check_id": check["check_id"], "versions": check["versions"]}
    if force:
        return {
            "status": "forced",
            "reason": f"no passed skew check for {version} in {registry}/skew/{family}",
        }
    raise ValueError(
        f"skew gate: family {family!r} has no passed version-skew check that includes {version} in {registry}/skew/{family}; "
        "run `python -m jobs.skew_check --checkpoints <previous> <this> --registry ...` or pass --force-unchecked"
    )
