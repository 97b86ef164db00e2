"""Running the registry: recovery at start, the Granian HTTP server, and `serve` for tests and the CLI.

Granian serves the ASGI app and implements the ``http.response.pathsend`` extension,
so whole blobs go from the file to the socket without passing through Python.

At every start, before the first request, `recover` removes what a crash can leave:
temp files and staging directories, and blobs that no version references and that
are older than `orphan_grace` seconds (younger ones may belong to a publish in flight).
While it runs, uploads trigger the same sweep now and then (`sweep.Sweeper`).

`serve` starts the server in a child process (its own process group, so it can be
stopped or killed whole) and returns once it answers; ``port=0`` picks a free port.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from ..errors import UsageError
from .blobs import DirBlobStore
from .store import open_store
from .sweep import ORPHAN_GRACE, sweep

_DATA_ENV, _INSTANCE_ENV, _IDLE_ENV = "LWHUB_SERVER_DATA", "LWHUB_SERVER_INSTANCE", "LWHUB_SERVER_UPLOAD_IDLE"


def check_upload_idle(seconds: float | None) -> None:
    """None keeps the app's default; otherwise a number of seconds above 0 (inf: no limit)."""
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):  # NaN is not > 0
        raise UsageError(f"upload idle time {seconds!r}: seconds above 0 (inf for no limit)")


def recover(data_dir: str | Path, *, orphan_grace: float = ORPHAN_GRACE) -> dict[str, int]:
    """Clean what a crash left in `data_dir`; returns counts of removed temp entries and orphan blobs."""
    return sweep(open_store(data_dir), DirBlobStore(data_dir), grace=orphan_grace, temp_grace=0.0)


def worker_app():
    """Granian's factory in each worker process: the app on the data dir `run_server` chose."""
    from .app import create_app

    idle = {"upload_idle": float(os.environ[_IDLE_ENV])} if os.environ.get(_IDLE_ENV) else {}
    return create_app(os.environ[_DATA_ENV], instance=os.environ.get(_INSTANCE_ENV, ""), **idle)


def run_server(data_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8700, workers: int = 1, instance: str = "",
               upload_idle: float | None = None, ready: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Recover `data_dir`, then serve it until interrupted (blocking; what `lwhub serve` runs).

    `ready(url)` is called once every check has passed and the data directory is held, just
    before serving. Port 0 picks a free port, which the URL names.
    """
    from granian import Granian

    check_upload_idle(upload_idle)
    ensure_port_free(host, port)
    if port == 0:  # chosen here: each of Granian's workers would bind a port of its own, and none be named
        port = free_port(host)
    data = Path(data_dir).resolve()
    hold_data_dir(data)  # before recover, which would delete another registry's uploads in flight
    recover(data)
    os.environ[_DATA_ENV], os.environ[_INSTANCE_ENV] = str(data), instance
    os.environ[_IDLE_ENV] = "" if upload_idle is None else repr(float(upload_idle))  # None: the app's default
    try:
        if ready is not None:
            ready(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        Granian(
            "lwhub.server.run:worker_app", address=host, port=port, interface="asgi", factory=True,
            workers=workers, log_level="warning", backlog=1024,
        ).serve()  # fmt: skip
    finally:
        release_data_dir()


LOCK_FILE = "registry.lock"
_held: list[int] = []  # the lock's descriptor, open as long as this process serves


def hold_data_dir(data: Path) -> None:
    """Refuse a data directory another registry serves (`flock` on ``registry.lock``, held
    until this process ends; the workers it starts serve under it). Commands that only
    write the database (``lwhub account create --data``) need no lock: SQLite orders them."""
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{data}: another registry serves this data directory (it holds {LOCK_FILE}); stop it "
                         "first, or give another one") from None  # fmt: skip
    _held.append(fd)


def release_data_dir() -> None:
    """Let the data directory go (closing the lock's descriptor releases the lock)."""
    while _held:
        os.close(_held.pop())


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. Granian binds with SO_REUSEPORT (for its
    workers), so a second registry on the port would start and take half the requests."""
    if not 0 <= port <= 65535:  # bind() would raise OverflowError: a traceback, not a usage error
        raise UsageError(f"port {port}: a TCP port is 0 to 65535; check --port", path=f"{host}:{port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed connection's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as exc:
            why = ("is in use; stop what listens there or pick another --port" if exc.errno == errno.EADDRINUSE
                   else f"cannot be listened on ({exc.strerror or exc}); check --host and --port")  # fmt: skip
            raise UsageError(f"{host}:{port} {why}", path=f"{host}:{port}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    """A registry child process: `url`; `stop()` ends it gracefully, `kill()` at once."""

    url: str
    data_dir: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, as far as the data dir can tell."""
        self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, sig: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def __str__(self) -> str:
        return self.url

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(data_dir: str | Path, host: str = "127.0.0.1", port: int = 0, *, workers: int = 1,
          timeout: float = 60.0, upload_idle: float | None = None, preexec_fn=None) -> RunningServer:  # fmt: skip
    """Start the registry on `data_dir` in a child process; return once it answers.

    ``port=0`` picks a free port; a unique instance id in the health answer proves that
    the server answering is this one, and a lost race for the port is retried.
    """
    check_upload_idle(upload_idle)
    ensure_port_free(host, port)
    for _ in range(5):
        instance, chosen = secrets.token_hex(8), port or free_port(host)
        cmd = [sys.executable, "-m", "lwhub.server", str(data_dir), "--host", host, "--port", str(chosen),
               "--workers", str(workers), "--instance", instance]  # fmt: skip
        if upload_idle is not None:
            cmd += ["--upload-idle", repr(float(upload_idle))]
        # preexec_fn is for tests only (a file-size limit for the full-disk test); None otherwise.
        process = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)  # noqa: PLW1509
        server = RunningServer(f"http://{host}:{chosen}", Path(data_dir), process)
        if _wait_ready(server, instance, timeout):
            return server
        server.kill()
        if port:
            break
    raise RuntimeError(f"the registry on {data_dir} did not start on {host}:{port or 'a free port'}")


def _wait_ready(server: RunningServer, instance: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                if http.get(server.url + "/v1/health").json().get("instance") == instance:
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
    return False
