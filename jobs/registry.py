"""Inspect and operate the build registry.

python -m jobs.registry [--registry registry] list
python -m jobs.registry current
python -m jobs.registry show [BUILD_ID]     # a build's layout, shards (id range, rows, node, version),
                                            # partitions, per-phase timings (default: the live one)
python -m jobs.registry rollback            # one step back: end the canary, else the previously live build
python -m jobs.registry promote [BUILD_ID]  # make any complete build live (default: the canary)
python -m jobs.registry canary BUILD_ID --percent P   # serve BUILD_ID to P % of users (stable by user id)
python -m jobs.registry abort               # end the canary: every user back on the live build
python -m jobs.registry diff A B [--json]   # the cut-over comparison of two builds (health, overlap, quality)
python -m jobs.registry gc [--dry-run]      # never removes the live build or its rollback targets
python -m jobs.registry sidecar             # the fresh-item log: generation, entries, size
python -m jobs.registry sidecar-fold        # drop entries the live build's catalog serves (archived)

A rebuild folds the sidecar into its new base by itself after it publishes; `sidecar-fold` redoes
that step (e.g. after a rebuild was killed between publishing and folding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.storage.datasets import is_dataset, partition_files
from core.storage.registry import Registry
from core.storage.sidecar_log import Position, entry_problem, open_log
from core.storage.store import Uri, location
from jobs.common import run_main


def _describe(reg: Registry, build_id: str) -> dict:
    m = reg.manifest(build_id)
    return {
        "build_id": build_id,
        "checkpoint_version": m.checkpoint_version,
        "items": m.catalog.row_count,
        "users": m.users.row_count if m.users else None,
        "index": m.index.factory,
        "search_params": m.index.search_params,
        "recall_at_10": m.quality.get("recall_at_k"),
        "layout": m.index.layout,
        "created_at": m.created_at,
    }


def _show(reg: Registry, build_id: str) -> dict:
    """Where a build came from: its shards and their provenance, its partitions, its phases."""
    m = reg.manifest(build_id)
    keys = ("shard", "rows", "id_lo", "id_hi", "row_offset", "node", "checkpoint_version", "add_s")
    return {
        **_describe(reg, build_id),
        "checkpoint_versions": m.homogeneity["checkpoint_versions"],
        "shards": [{k: s.get(k) for k in keys if k in s} for s in m.index.shards],
        "parts": m.parts,
        "timings": m.timings,
        "selection": m.quality.get("selection"),
        "training": {
            "sample": m.index.train_sample,
            "kmeans_iters": m.index.kmeans_iters,
            "refit": m.index.refit,
        },
        "queries": m.quality.get("queries"),
    }


def default_holdout(users: Path | Uri) -> Path | Uri | None:
    """Held-out interactions beside a users dataset, (USERS/../interactions/test)."""
    test = location(users).parent / "interactions" / "test"
    return test if is_dataset(test) else None


def _diff(reg: Registry, a) -> int:
    # torch and faiss load here, for the commands that read builds: a rollback, canary or promote
    # (pointer swaps, what an operator runs in an incident) answers in well under a second
    from core.quality import compare as cmp
    from core.serving.live_build import load_build

    base = load_build(reg.build_dir(a.base), mmap=True)
    new = load_build(reg.build_dir(a.new), mmap=True)
    users = a.users or (location(new.manifest.users.path) if new.manifest.users else None)
    if users is None:
        print(f"build {a.new} has no users dataset on record; name one with --users")
        return 2
    holdout = a.holdout or default_holdout(users)
    result = cmp.compare(
        base,
        new,
        cmp.eval_users(
            users,
            holdout,
            [s.name for s in new.model.user_inputs],
            new.model.manifest.user_id,
            a.sample_users,
        ),
        base.manifest.quality.get("k", 10),
    )
    result["refused_for"] = cmp.judge(result, cmp.Limits())
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_diff(result))
    return 0


def format_diff(r: dict) -> str:
    """The comparison as a table: one row per figure, the base and the new build side by side."""
    b, n, k = r["base"], r["new"], r["k"]
    rows = [
        ("build", b["build_id"], n["build_id"]),
        ("checkpoint", b["checkpoint_version"], n["checkpoint_version"]),
    ]
    for key in ("norm_mean", "mean_pair_cosine", "near_duplicate_share", "effective_rank"):
        rows.append((key.replace("_", " "), b["health"][key], n["health"][key]))
    q = r.get("quality")
    if q:
        rows.append((f"held-out Recall@{k}", q["recall_at_k_base"], q["recall_at_k_new"]))
    w = max(len(str(x)) for row in rows for x in row)
    lines = [f"{str(x):<24}{str(y):>{w}}  {str(z):>{w}}" for x, y, z in rows]
    lines.append(f"top-{k} overlap {r['overlap_at_k']} over {r['users']['compared']} users"
                 + (f"; relative Recall@{k} drop {q['relative_drop']:.1%} over {q['users']} users" if q else ""))  # fmt: skip
    why = r.get("refused_for") or []
    lines.append("gate (default limits): " + ("PASS" if not why else "REFUSE: " + "; ".join(why)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.registry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--registry", type=location, default=Path("registry"),
                   help="a directory, or s3://BUCKET/PREFIX / gs://BUCKET/PREFIX")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="all complete builds, the live one marked *, the canary ~")
    sub.add_parser("current", help="the live build")
    sh = sub.add_parser("show", help="a build's shards, their nodes and versions, partitions and timings")
    sh.add_argument("build_id", nargs="?", help="default: the live build")
    sub.add_parser("rollback", help="make the previously live build live again")
    pr = sub.add_parser("promote", help="make BUILD_ID live for every user (default: the canary)")
    pr.add_argument("build_id", nargs="?")
    ca = sub.add_parser("canary", help="serve BUILD_ID to PERCENT %% of users beside the live build")
    ca.add_argument("build_id")
    ca.add_argument("--percent", type=float, required=True, help="share of users, by a stable hash of the id")
    sub.add_parser("abort", help="end the canary; every user back on the live build")
    df = sub.add_parser("diff", help="compare two builds: health of each, top-k overlap, held-out quality")
    df.add_argument("base", help="the reference build (e.g. the live one)")
    df.add_argument("new", help="the build compared with it")
    df.add_argument("--users", type=location, help="users dataset (default: the one NEW was built with)")
    df.add_argument(
        "--holdout", type=location, help="held-out interactions (default: USERS/../interactions/test)"
    )
    df.add_argument("--sample-users", type=int, default=2000)
    df.add_argument("--json", action="store_true", help="print the comparison as JSON")
    gc = sub.add_parser("gc", help="delete old builds and crashed staging directories")
    gc.add_argument("--rollback-window", type=int, default=2, help="earlier live builds kept for rollback")
    gc.add_argument("--keep-extra", type=int, default=2, help="newest other builds kept")
    gc.add_argument("--stale-staging-s", type=float, default=3600.0)
    gc.add_argument("--dry-run", action="store_true")
    sub.add_parser("sidecar", help="the fresh-item sidecar log: generation, entries, size")
    sub.add_parser("sidecar-fold", help="drop sidecar entries the live build's catalog already serves")
    a = p.parse_args(argv)
    reg = Registry(a.registry)
    if a.cmd == "list":
        ptr = reg.pointer()
        live = ptr.build_id
        for b in reg.list_builds():
            d = _describe(reg, b)
            mark = "*" if b == live else "~" if b == ptr.canary else " "
            print(
                f"{mark} {b}  {d['checkpoint_version']}  {d['items']:>10,} items  {d['index']} {d['search_params']}  recall@10 {d['recall_at_10']}"
            )
    elif a.cmd == "current":
        ptr = reg.pointer()
        if ptr.build_id is None:
            print(f"no live build in {a.registry}")
            return 1
        print(
            json.dumps(
                {
                    **_describe(reg, ptr.build_id),
                    "seq": ptr.seq,
                    "canary": None
                    if ptr.canary is None
                    else {"build_id": ptr.canary, "percent": ptr.percent},
                    "since": ptr.log[-1]["at"] if ptr.log else None,
                },
                indent=2,
            )
        )
    elif a.cmd == "show":
        build = a.build_id or reg.current()
        if build is None:
            print(f"no live build in {a.registry}; name one (python -m jobs.registry list)")
            return 1
        print(json.dumps(_show(reg, build), indent=2))
    elif a.cmd == "rollback":
        before, canary = reg.current(), reg.pointer().canary
        ptr = reg.rollback()
        if canary is not None:
            print(f"rolled back: canary {canary} ended, every user on {ptr.build_id} (seq {ptr.seq})")
            return 0
        # the sidecar entries folded into the build we left come back: the live build never served them
        restored = open_log(a.registry).restore_folded(before)
        print(
            f"rolled back: {before} -> {ptr.build_id} (seq {ptr.seq}); sidecar entries restored: {restored}"
        )
    elif a.cmd == "promote":
        before = reg.current()
        ptr = reg.promote(a.build_id)
        print(f"promoted: {before} -> {ptr.build_id} (seq {ptr.seq}); every user is served by it")
    elif a.cmd == "canary":
        ptr = reg.canary(a.build_id, a.percent)
        print(
            f"canary: {ptr.canary} serves {ptr.percent:g}% of users, live {ptr.build_id} the rest (seq {ptr.seq})"
        )
    elif a.cmd == "abort":
        before = reg.pointer().canary
        ptr = reg.abort()
        print(f"aborted canary {before}: every user on {ptr.build_id} (seq {ptr.seq})")
    elif a.cmd == "diff":
        return _diff(reg, a)
    elif a.cmd == "gc":
        removed = reg.gc(a.rollback_window, a.keep_extra, a.stale_staging_s, a.dry_run)
        print(("would remove: " if a.dry_run else "removed: ") + (", ".join(removed) or "nothing"))
    elif a.cmd == "sidecar":
        log = open_log(a.registry)
        r = log.read(Position())
        bad = sum(entry_problem(e) is not None for e in r.entries)
        latest = {e["item_id"]: e["op"] for e in r.entries if entry_problem(e) is None}
        print(json.dumps({
            "log": log.where, "generation": r.position.generation, "position": r.position.offset,
            "lines": len(r.entries), "malformed_lines": bad,
            "upserted_items": sum(op == "upsert" for op in latest.values()),
            "deleted_items": sum(op == "delete" for op in latest.values()),
        }, indent=2))  # fmt: skip
    elif a.cmd == "sidecar-fold":
        live = reg.current()
        if live is None:
            print(f"no live build in {a.registry}: nothing to fold into")
            return 1
        from core.serving.sidecar import fold_into_base  # torch: see _diff

        catalog = reg.manifest(live).catalog.path
        stats = fold_into_base(a.registry, live, partition_files(catalog))
        print(f"folded into {live}: " + json.dumps(stats))
    return 0


if __name__ == "__main__":
    run_main(main)
