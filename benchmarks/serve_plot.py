"""The PNGs of the serving benchmarks: serve_load (capacity and unloaded latency against candidates per
request) and serve_sharded (latency against offered load, sharded vs merged)."""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    style = {
        "on": ("C0", "broadcast on"),
        "off": ("C3", "broadcast off"),
        "noop": ("grey", "no-op app (Serve)"),
        "on_b": ("C2", "broadcast on, copy B (A/A)"),
    }
    for app, (color, label) in style.items():
        rows = sorted((s for s in result["summary"] if s["app"] == app), key=lambda s: s["n"])
        if not rows:
            continue
        ns = [s["n"] for s in rows]
        cps = [s["capacity_cps"] for s in rows]
        # clamped: the median is rounded to 3 decimals, so an edge can sit a hair inside it
        lo = [max(0.0, c - min(s["capacity_rps_rounds"]) * s["n"]) for c, s in zip(cps, rows, strict=True)]
        hi = [max(0.0, max(s["capacity_rps_rounds"]) * s["n"] - c) for c, s in zip(cps, rows, strict=True)]
        ls = "--" if app == "noop" else "-"
        left.errorbar(ns, cps, yerr=[lo, hi], fmt="o" + ls, color=color, label=label, capsize=3)
        right.plot(ns, [s["unloaded_p50_ms"] for s in rows], "o" + ls, color=color, label=f"{label} p50")
        right.plot(ns, [s["unloaded_p99_ms"] for s in rows], "^:", color=color, label=f"{label} p99")
    cfg = result["config"]
    left.set(
        xscale="log",
        yscale="log",
        xlabel="candidates per request (N)",
        ylabel="capacity, candidates/s",
        title=f"max rate with p99 <= {cfg['slo_p99_ms']:.0f} ms, <= {100 * cfg['max_fail_frac']:g}% failed "
        f"(median of {cfg['repeats']}, bars min-max)",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="candidates per request (N)",
        ylabel="latency, ms",
        title=f"unloaded latency at {cfg['low_rate']:g} req/s (median of rounds)",
    )
    right.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())  # latencies span < 2 decades
    for ax in (left, right):
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    b, m = result["build"], result["machine"]
    fig.suptitle(
        f"POST /score, open loop, {result.get('ingress', 'default')} ingress, one replica each: build {b['build_id']} ({b['users']:,} users, "
        f"{b['items']:,} items), {m['cpu_count']} CPUs, ray {m['ray_version']}, torch {m['torch_version']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_sharded(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = list(result["summary"])
    fig, axes = plt.subplots(1, len(eps), figsize=(6.5 * len(eps), 4.8), squeeze=False)
    for ax, ep in zip(axes[0], eps, strict=True):
        rows = result["summary"][ep]["rates"]
        for app, color in (("merged", "C0"), ("sharded", "C1")):
            ok = [r for r in rows if r[app]["passed"]]
            x = [r["offered_rps"] for r in ok]
            ax.plot(x, [r[app]["p50_ms"] for r in ok], "o-", color=color, label=f"{app} p50")
            ax.plot(x, [r[app]["p99_ms"] for r in ok], "^--", color=color, label=f"{app} p99")
        ax.set(xlabel="offered load, req/s", ylabel="latency, ms (median of repeats)", title=f"POST /{ep}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    b, c = result["build"], result["config"]
    fig.suptitle(f"{b['shards']} shard replicas vs one merged replica: build {b['build_id']} ({b['items']:,} items, "
                 f"{b['users']:,} users, {b['index']}), open loop, {c['repeats']} repeats interleaved, "
                 f"{result['machine']['cpu_count']} CPUs", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
