"""A throwaway local PostgreSQL server (``initdb`` + ``pg_ctl``) for the tests and ``bench state``.

Not how VisionRoute runs in production (there PostgreSQL is managed or replicated, see
docs/operations.md): this starts a private server in a temporary directory on a free
loopback port, trusts local connections, and removes everything on ``stop()``.

PostgreSQL refuses to run as root, and CI runs as root: the data directory is then owned by,
and the server run as, the ``postgres`` user (Debian's package creates it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in BIN_DIRS:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    return None


def available() -> str | None:
    """None when a server can be started here, else why not."""
    missing = [name for name in ("initdb", "pg_ctl") if postgres_bin(name) is None]
    if missing:
        return f"PostgreSQL binaries {missing} not found (scripts/postgres_deps.sh installs them)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPostgres:
    """``start()`` → a DSN for the ``postgres`` database; ``create_database()`` → a fresh one."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="visionroute-pg-"))
        self.port = _free_port()
        self.as_user: str | None = "postgres" if os.geteuid() == 0 else None
        self.started = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        if self.as_user:
            user = pwd.getpwnam(self.as_user)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        data = self.dir / "db"
        self._run(postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            " -c fsync=on -c shared_buffers=32MB"
        )
        result = self._run(
            postgres_bin("pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = (
                (self.dir / "log").read_text(errors="replace")[-2000:] if (self.dir / "log").exists() else ""
            )
            raise RuntimeError(f"pg_ctl start failed: {result.stderr.strip()} {log}")
        self.started = True
        return self.dsn("postgres")

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (fast: connections are cut) and start again after ``down_s``."""
        self.stop_server()
        time.sleep(down_s)
        self.start_server()

    def stop_server(self) -> None:
        self._run(postgres_bin("pg_ctl"), "-D", str(self.dir / "db"), "-m", "fast", "-w", "stop", check=False)

    def start_server(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(
            postgres_bin("pg_ctl"),
            "-D",
            str(self.dir / "db"),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        if self.started:
            self.stop_server()
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
