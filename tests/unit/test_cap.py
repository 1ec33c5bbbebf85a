"""The unique-user cap recommender on synthetic Prometheus histograms (no Ray, no server)."""

import json

import numpy as np
import pytest

from core.serving.cap import Histogram, counter_sum, parse_histogram, recommend
from jobs import recommend_cap

BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _scrape(per_replica: dict[str, list[int]], app="main", extra="") -> str:
    """Prometheus text of the replicas' histograms: observations -> cumulative buckets, like Ray's."""
    lines = ["# TYPE ray_skewless_batch_unique_users_hist histogram"]
    for replica, obs in per_replica.items():
        obs = np.asarray(obs)
        labels = f'application="{app}",replica="{replica}"{extra}'
        for b in [*BOUNDS, float("inf")]:
            le = "+Inf" if b == float("inf") else f"{float(b)}"
            lines.append(
                f'ray_skewless_batch_unique_users_hist_bucket{{{labels},le="{le}"}} {int((obs <= b).sum())}'
            )
        lines.append(f"ray_skewless_batch_unique_users_hist_count{{{labels}}} {len(obs)}")
        lines.append(f"ray_skewless_scored_rows_total{{{labels}}} {int(obs.sum()) * 100}")
        lines.append(f"ray_skewless_batch_unique_users_total{{{labels}}} {int(obs.sum())}")
    return "\n".join(lines) + "\n"


def test_recommends_the_smallest_boundary_covering_999_per_mille_across_replicas():
    rng = np.random.default_rng(0)
    # 10,000 batches over 2 replicas: almost all below 30 unique users, 5 (0.05%) up to 200
    a = list(rng.integers(1, 30, 5000))
    b = list(rng.integers(1, 30, 4995)) + [150, 160, 170, 180, 200]
    h = parse_histogram(
        _scrape({"r1": a, "r2": b}) + _scrape({"x": [900] * 50}, app="other"), match={"application": "main"}
    )
    assert h.total == 10_000  # the other application is not summed in
    rec = recommend(h, 0.999)
    assert rec.cap == 32 and rec.over_cap == 5 and rec.covered == pytest.approx(0.9995)
    assert recommend(h, 1.0).cap == 256  # cover every batch: the largest one's boundary


def test_a_histogram_that_only_the_inf_bucket_covers_or_that_is_empty_is_refused_by_name():
    with pytest.raises(ValueError, match="largest boundary"):
        recommend(parse_histogram(_scrape({"r": [5000] * 10})), 0.999)
    with pytest.raises(ValueError, match="no batches yet"):
        recommend(Histogram((1.0, float("inf")), (0.0, 0.0)))
    with pytest.raises(ValueError, match="coverage"):
        recommend(parse_histogram(_scrape({"r": [1]})), 1.5)


def test_counter_sum_and_the_cli_on_a_saved_scrape(tmp_path, capsys):
    text = _scrape({"r1": [3, 3, 3], "r2": [6]})
    assert counter_sum(text, "ray_skewless_scored_rows_total", {"application": "main"}) == 1500
    f = tmp_path / "scrape.txt"
    f.write_text(text)
    assert recommend_cap.main(["--metrics", str(f), "--app", "main", "--coverage", "0.75"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_unique_users_per_batch"] == 4 and out["rows_per_unique_user"] == 100.0
    assert out["batches_observed"] == 4 and out["batches_over_cap"] == 1


def test_ingress_modes_name_their_variables_and_keep_haproxy_private():
    from pathlib import Path

    from serve_app.ingress import haproxy_pattern, ingress_env

    assert ingress_env("default") == {}
    fast = ingress_env("fast", Path("/tmp/shp-x"))
    assert fast["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == fast["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert fast["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/tmp/shp-x/admin.sock"
    assert fast["RAY_SERVE_HAPROXY_STATS_PORT"] != fast["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert haproxy_pattern(fast) == "/tmp/shp-x" and haproxy_pattern({}) is None
    with pytest.raises(ValueError, match="must be one of"):
        ingress_env("turbo")
    with pytest.raises(ValueError, match="<= 24 characters"):
        ingress_env("fast", Path("/tmp/a-very-long-private-directory-name"))
