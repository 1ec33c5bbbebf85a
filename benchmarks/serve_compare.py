"""What serve_load's modes are compared by: the A/A control, the F/T cost model, and the run of
several ingress modes one after the other (each in its own process) with their comparison table."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def aa_spread(a: list[dict], b: list[dict]) -> dict:
    """Two identical apps measured side by side: the capacity ratio on / on_b per round. Its spread is
    the bias and noise any on/off ratio carries before broadcast does anything."""
    rounds = [round(x["capacity_rps"] / y["capacity_rps"], 3) if y["capacity_rps"] else None
              for x, y in zip(a, b, strict=True)]  # fmt: skip
    ok = [r for r in rounds if r]
    return {"median_of_rounds": _median(ok), "rounds": rounds,
            "max_abs_dev": round(max(abs(r - 1) for r in ok), 3) if ok else None}  # fmt: skip


def cost_model(s: dict, n: int) -> dict:
    """F = the no-op app's machine CPU ms per request (Serve's fixed cost), T = each app's machine CPU
    per request minus F (its own work). On a CPU-bound machine capacity is cores / (F + T), so the model
    gain of broadcast is (F + T_off) / (F + T_on), checked against the measured capacity ratio."""
    cpu = {app: s[(app, n)]["cpu_ms_per_request_at_capacity"]["machine"] for app in ("noop", "on", "off", "on_b")
           if (app, n) in s}  # fmt: skip
    f = cpu.get("noop")
    out: dict = {
        "F_ms": f,
        "T_ms": {a: round(c - f, 3) for a, c in cpu.items() if a != "noop" and None not in (c, f)},
    }
    if f is not None and cpu.get("on") and cpu.get("off"):
        out["model_gain"] = round(cpu["off"] / cpu["on"], 3)
        if s[("off", n)]["capacity_rps"]:
            out["measured_gain"] = round(s[("on", n)]["capacity_rps"] / s[("off", n)]["capacity_rps"], 3)
    return out


def _without_ingress(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if x == "--ingress":
            skip = True
            continue
        if skip and not x.startswith("--"):
            continue
        skip = False
        out.append(x)
    return out


def run_modes(cfg, argv: list[str]) -> int:
    """Each ingress mode in its own child process (Serve reads the mode's variables once, when a Ray
    process imports it), one after the other; then the comparison of their headlines."""
    modes = cfg.ingress.split(",")
    for mode in modes:
        print(f"=== ingress {mode} ===", flush=True)
        rc = subprocess.run(
            [sys.executable, "-m", "benchmarks.serve_load", *_without_ingress(argv), "--ingress", mode]
        ).returncode
        if rc != 0:
            print(f"ingress {mode}: serve_load exited {rc}", file=sys.stderr)
            return rc
    suffix = "" if cfg.body == "json" else f"_{cfg.body}"
    results = {m: json.loads((cfg.out_dir / f"serve_load_{m}{suffix}.json").read_text()) for m in modes}
    both = {
        m: {"headline": r["headline"], "summary": r["summary"], "wall_s": r["wall_s"]}
        for m, r in results.items()
    }
    out = cfg.out_dir / f"serve_load_ingress{suffix}.json"
    out.write_text(json.dumps({"benchmark": "serve_load", "modes": both}, indent=2) + "\n")
    print(
        f"\n{'ingress':<8} {'N':>5} {'F ms':>6} {'T_on':>6} {'T_off':>6} {'model':>6} {'measured':>8} {'A/A':>6}"
    )
    for m, r in both.items():
        for n, c in r["headline"].get("cost_model", {}).items():
            aa = r["headline"].get("aa_spread", {}).get(n, {}).get("median_of_rounds")
            t = c.get("T_ms", {})
            print(f"{m:<8} {n:>5} {c['F_ms'] or float('nan'):>6.2f} {t.get('on', float('nan')):>6.2f} "
                  f"{t.get('off', float('nan')):>6.2f} {c.get('model_gain') or float('nan'):>6.2f} "
                  f"{c.get('measured_gain') or float('nan'):>8.2f} {aa or float('nan'):>6.3f}")  # fmt: skip
    print(f"wrote {out}")
    return 0
