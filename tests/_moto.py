"""A real S3-compatible server for tests: moto's server mode on a free loopback port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bucket: str = "fl-test"):
    """Start moto_server, create ``bucket``; returns (process, endpoint). Skips when moto is absent."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'moto[server]'); "
                                       "scripts/setup.sh installs it")
    pytest.importorskip("flask", reason="moto's server mode needs flask (pip install 'moto[server]')")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                p.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                      access_key="test", secret_key="test", allow_bucket_creation=True).create_dir(bucket)
    return p, endpoint


def env(endpoint: str) -> dict:
    """The standard AWS variables that point flightlog (and any S3 client) at the test server."""
    return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def stop(p) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
