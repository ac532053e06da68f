"""A real S3 API on loopback for tests: moto's standalone server in a child process.

    with start_moto_server() as endpoint:   # "http://127.0.0.1:PORT"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)

Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to any value and AWS_DEFAULT_REGION=us-east-1 in the test.
Only the process started here is stopped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port the OS reports free on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_executable() -> str:
    """``moto_server`` next to this interpreter (the virtualenv), else on PATH."""
    local = Path(sys.executable).parent / "moto_server"
    found = str(local) if local.exists() else shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    return found


@contextmanager
def start_moto_server(timeout: float = 60.0) -> Iterator[str]:
    """Start ``moto_server -H 127.0.0.1 -p PORT``, wait until it answers HTTP, yield its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [moto_server_executable(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with code {proc.returncode} before answering on {endpoint}"
                )
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:  # an HTTP answer, even an error status, means it is up
                break
            except OSError:  # URLError, refused, reset: not up yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not answer on {endpoint} within {timeout} s"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
