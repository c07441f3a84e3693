"""Run the service as a child process: a real uvicorn server on a free loopback port.

    with ServiceProcess({"NETVLAD_INDEX_DIR": "idx"}) as server:
        httpx.get(server.url + "/readyz")

Used by the HTTP tests and the service benchmarks; settings are passed as NETVLAD_* variables.
`memory_of(pid)` reads a process's resident and peak resident memory from /proc, and
`search_burst_memory` measures a server's memory through a burst of concurrent searches.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def memory_of(pid: int, reset_peak: bool = False) -> dict[str, int]:
    """{"rss": resident bytes now, "peak": peak resident bytes} of process `pid` (Linux). With
    `reset_peak` the peak restarts from now (writing 5 to /proc/PID/clear_refs)."""
    if reset_peak:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}
    return {"rss": kib["VmRSS"], "peak": kib["VmHWM"]}


def search_burst_memory(server: "ServiceProcess", photos: list[bytes], clients: int) -> dict:
    """Resident memory of `server` (bytes) through `clients` concurrent searches, each with all of
    `photos` (PNG bytes), after one warm-up search: {"before", "peak", "after", "statuses", "seconds"}."""
    with httpx.Client(base_url=server.url, timeout=600) as client:
        def one(i: int) -> int:
            files = [("images", (f"photo-{i}-{j}.png", data, "image/png")) for j, data in enumerate(photos)]
            return client.post("/v1/search", files=files).status_code

        one(-1)
        time.sleep(1.0)
        before = memory_of(server.process.pid, reset_peak=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = sorted(set(pool.map(one, range(clients))))
        seconds = time.perf_counter() - start
        time.sleep(1.0)
        after = memory_of(server.process.pid)
    return {"before": before["rss"], "peak": after["peak"], "after": after["rss"], "statuses": statuses,
            "seconds": seconds}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """`python -m uvicorn service.app:create_app --factory` with `env` added to this environment,
    or another `command` serving on `host`:`port` (e.g. `netvlad serve ...`)."""

    def __init__(self, env: dict[str, str], host: str = "127.0.0.1", port: int | None = None,
                 log: str | os.PathLike | None = None, startup_timeout: float = 120.0,
                 command: list[str] | None = None):
        self.env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        self.host = host
        self.port = port or free_port(host)
        self.command = command or [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
                                   "--host", self.host, "--port", str(self.port), "--log-level", "warning"]
        self.log_path = Path(log) if log else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServiceProcess":
        """Start the server and wait until /readyz answers 200 (RuntimeError with its log if not)."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the service was not ready within {self.startup_timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM: uvicorn runs the shutdown); returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """Crash it (SIGKILL): no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
