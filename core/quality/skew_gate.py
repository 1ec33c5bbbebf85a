"""The persisted half of the version-skew check: verdicts, their storage in the registry, and the gates
that read them (publishing a checkpoint, serving a query tower against another version's index).

Plain numpy and JSON: serving imports this, never the evaluation in `core.quality.skew` (which trains nothing
but imports the training loop's embedding helpers).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np

from core.storage.store import CREATE, is_remote, open_store


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


def save(registry: Path | str, result: dict) -> str:
    """One verdict object, created once (never replaced) in the registry (a directory or a URL)."""
    check_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    key = f"skew/{result['family']}/{check_id}.json"
    stamped = {
        **result,
        "check_id": check_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store = open_store(registry)
    store.put(key, (json.dumps(stamped, indent=2, sort_keys=True) + "\n").encode(), mode=CREATE)
    return f"{store.url}/{key}"


def load_all(registry: Path | str, family: str) -> list[dict]:
    store = open_store(registry)
    keys = sorted(k for k, _ in store.list(f"skew/{family}/") if k.endswith(".json") and k.count("/") == 2)
    return [json.loads(store.get(k)[0]) for k in keys]


def stamp(registry: Path | str, family: str):
    """Something that changes when a verdict of `family` is added: the directory's mtime, or on an
    object store the list of verdict objects (one LIST request)."""
    if is_remote(registry):
        return tuple(k for k, _ in open_store(registry).list(f"skew/{family}/"))
    d = Path(registry) / "skew" / family
    return d.stat().st_mtime_ns if d.is_dir() else None


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
