"""`python app.py --port N ARGS` as a child process that answers on `url`: used by the benchmarks and the tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """The studio on a free port; `ready_after` is the seconds from start until the page answered. Its renders go
    to `outputs`: the `--outputs` given, else a new temporary folder removed by stop()."""

    def __init__(self, *args: str, log: Path | None = None, timeout: float = 120.0):
        self._own_outputs = "--outputs" not in args
        if self._own_outputs:
            args = (*args, "--outputs", tempfile.mkdtemp(prefix="studio-outputs-"))
        self.outputs = Path(args[args.index("--outputs") + 1])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log or REPO / ".cache" / f"app-{self.port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        self._log_file = self.log.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *args], cwd=REPO,
                                        stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.ready_after = self._wait(timeout)

    def _wait(self, timeout: float) -> float:
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"app.py did not answer on {self.url} within {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_for_log(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if text in self.log.read_text():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not in the app log after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        if self._own_outputs:
            shutil.rmtree(self.outputs, ignore_errors=True)
