"""The rebuild with its package, catalog, users and registry in object storage against the same
rebuild on local disk, interleaved in one run (local, bucket, local, bucket, ...).

    python -m benchmarks.rebuild_storage --package packages/<A> --catalog data/synth-1m/catalog \\
        --users data/synth-1m/users --repeats 3 --out benchmarks/results/rebuild_storage_1m.json \\
        -- --num-workers 2 --cpus-per-worker 1 --torch-threads 1

The bucket is a real S3-compatible server on loopback (SeaweedFS, tests/s3server.py) that this
benchmark starts, with its data on the same disk: what it measures is the object-store path's own
cost (reads through pyarrow's S3 client, the build's upload with a sha256 per file, the verified
fetch for the comparison), not a network. The inputs are uploaded once before the first round (timed
apart). Each job runs as `python -m jobs.rebuild_index`, a subprocess connected to one local Ray
that this benchmark holds, which also gets the server's endpoint and credentials in its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job(args: argparse.Namespace, package: str, catalog: str, users: str, registry: str, address: str,
        env: dict) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.rebuild_index", "--package", package, "--catalog", catalog, "--users", users,
           "--registry", registry, "--force-unchecked", "--no-compare", "--address", address, *args.job_args]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"rebuild failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    summary = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("SUMMARY "))[8:])
    return {"wall_s": round(wall, 2), "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rebuild_storage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--catalog", type=Path, required=True)
    p.add_argument("--users", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/rebuild_storage.json"))
    p.add_argument("job_args", nargs="*", help="after --: passed to jobs.rebuild_index")
    args = p.parse_args(argv)

    import ray

    from tests.s3server import S3Server

    work = Path(tempfile.mkdtemp(prefix="rebuild-storage-"))
    with S3Server(work / "s3") as s3:
        s3.make_bucket("bench")
        os.environ.update(s3.env())  # this process, the local Ray it starts and every job it runs
        os.environ["SKEWLESS_CACHE_DIR"] = str(work / "cache")  # node cache and staging: removed with `work`
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        t0 = time.perf_counter()
        for src, dst in ((args.package, "packages/pkg"), (args.catalog, "catalog"), (args.users, "users")):
            subprocess.run([sys.executable, "-m", "jobs.upload", str(src), f"s3://bench/{dst}"], cwd=REPO, env=env,
                           check=True, capture_output=True)  # fmt: skip
        upload_s = round(time.perf_counter() - t0, 2)
        print(f"inputs uploaded to the bucket in {upload_s} s", flush=True)
        ray.init(include_dashboard=False)
        address = ray.get_runtime_context().gcs_address
        rounds = []
        try:
            for r in range(args.repeats):
                local = job(args, str(args.package.resolve()), str(args.catalog.resolve()), str(args.users.resolve()),
                            str(work / f"reg-local-{r}"), address, env)  # fmt: skip
                bucket = job(args, "s3://bench/packages/pkg", "s3://bench/catalog", "s3://bench/users",
                             f"s3://bench/reg-{r}", address, env)  # fmt: skip
                ratio = bucket["wall_s"] / local["wall_s"]
                rounds.append({"local": local, "bucket": bucket, "ratio": round(ratio, 3)})
                print(
                    f"round {r + 1}: local {local['wall_s']} s, bucket {bucket['wall_s']} s = {ratio:.3f}x",
                    flush=True,
                )
        finally:
            ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)  # the server's data, the registries, the caches

    def med(key, where):
        return round(statistics.median(x[where]["wall_s"] if key == "wall_s" else x[where]["summary"]["timings"].get(key, 0)
                                       for x in rounds), 2)  # fmt: skip

    phases = sorted(
        {k for x in rounds for w in ("local", "bucket") for k in x[w]["summary"].get("timings", {})}
    )
    result = {
        "benchmark": "rebuild_storage", "items": rounds[0]["local"]["summary"].get("items"), "repeats": args.repeats,
        "job_args": args.job_args, "upload_inputs_s": upload_s,
        "median_wall_s": {"local": med("wall_s", "local"), "bucket": med("wall_s", "bucket")},
        "ratio_median_of_rounds": round(statistics.median(x["ratio"] for x in rounds), 3),
        "phases_median_s": {k: {"local": med(k, "local"), "bucket": med(k, "bucket")} for k in phases},
        "rounds": rounds,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
