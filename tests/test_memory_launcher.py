"""memory_server.launcher: an embedded server dies with the process that started it (kill -9 included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from memory_server.client import MemoryClient
from memory_server.launcher import start_server

pytestmark = pytest.mark.integration

STARTER = r"""
import sys, time
from memory_server.launcher import start_server
server = start_server(sys.argv[1], bind="tcp://127.0.0.1:0")
print(server.pid, server.endpoint, flush=True)
time.sleep(600)
"""


def test_server_terminates_when_its_parent_is_killed_and_frees_the_data_dir(tmp_path):
    data = tmp_path / "mem"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", STARTER, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid_text, endpoint = parent.stdout.readline().split()
        server = psutil.Process(int(pid_text))
        with MemoryClient(endpoint) as client:
            client.create(capacity=8, key_dim=4, value_dim=3, seed=1)
        os.kill(parent.pid, signal.SIGKILL)  # the trainer dies without cleaning up
        parent.wait(timeout=30)
        server.wait(timeout=60)  # raises psutil.TimeoutExpired if the server outlived its parent
    finally:
        if parent.poll() is None:
            parent.kill()
    # The lock is free: a new server on the same data dir starts and holds the memory created before.
    with start_server(data, bind="tcp://127.0.0.1:0") as again, MemoryClient(again.endpoint) as client:
        assert client.info()["capacity"] == 8
