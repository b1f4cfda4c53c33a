"""What the soak measures about processes (/proc: psutil is not a dependency) and the
database: RSS and open fds per role, the database's connections by owner, growth after warm-up."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.benchmarks.soak_options import GROWTH_LIMIT

if TYPE_CHECKING:
    from evals.benchmarks.soak_service import SoakService


# -- processes and resources (/proc: psutil is not a dependency) -----------------------------------


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def session_processes(session_id: int) -> dict[int, str]:
    """pid -> command line of every process in the session (``serve run``'s: Ray and replicas)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    found[int(entry.name)] = _cmdline(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
    return found


def postgres_processes(data_dir: Path) -> dict[int, str]:
    """The postmaster (its pid file) and its children."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if int(entry.name) == postmaster or ppid == postmaster:
                found[int(entry.name)] = "postgres"
        except (OSError, ValueError, IndexError):
            continue
    return found


def role_of(cmdline: str) -> str:
    """A process's role, stable across restarts: ``replica:Ingress``, ``ServeController``, ``raylet``."""
    if "ServeReplica:" in cmdline:
        return "replica:" + cmdline.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
    if cmdline.startswith("ray::"):
        return cmdline[5:].split()[0].split(".")[0]  # the title names the method it runs now
    argv = cmdline.split()
    if not argv:
        return "?"
    name = Path(argv[0]).name
    if name.startswith("python") and "-c" in argv:
        return "python -c"
    if name.startswith("python") and len(argv) > 1:
        script = next((a for a in argv[1:] if not a.startswith("-")), argv[1])
        return Path(script).name
    return name


def process_figures(pid: int) -> tuple[float, int | None] | None:
    """(RSS in MiB, open file descriptors or None when not readable); None when gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return rss_kib / 1024.0, fds


POOL_NAME = re.compile(r"^visionroute pid=(\d+) store=(\S+)$")  # visionroute/state.py names pools so


def database_connections(dsn: str) -> list[tuple[str, str, int]] | None:
    """(application_name, state, count) of every connection to the database but this one;
    None if unreachable."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT application_name, COALESCE(state, 'unknown'), COUNT(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
        return [(name, state, int(n)) for name, state, n in rows]
    except psycopg.Error:
        return None


def connections_by_owner(rows: list[tuple[str, str, int]], roles_by_pid: dict[int, str]) -> dict[str, Any]:
    """The connections grouped by whose they are: each store pool's process (by its role), a
    process that is gone (its connections outlived it: a leak), or another client."""
    by_state: Counter[str] = Counter()
    by_role: Counter[str] = Counter()
    by_store: Counter[str] = Counter()
    pools: Counter[tuple[int, str]] = Counter()
    dead_pids: set[int] = set()
    for name, state, count in rows:
        by_state[state] += count
        match = POOL_NAME.match(name or "")
        if match is None:
            by_role["other client"] += count
            continue
        pid, store = int(match.group(1)), match.group(2)
        pools[pid, store] += count
        by_store[store] += count
        role = roles_by_pid.get(pid)
        if role is None:
            dead_pids.add(pid)
            role = "process gone"
        by_role[role] += count
    return {
        "by_state": dict(sorted(by_state.items())),
        "by_role": dict(sorted(by_role.items())),
        "by_store": dict(sorted(by_store.items())),
        "pools": len(pools),
        "largest_pool": max(pools.values(), default=0),
        "of_processes_gone": by_role.get("process gone", 0),
        "processes_gone": sorted(dead_pids),
    }


def resource_snapshot(
    service: SoakService, pg_data_dir: Path | None, vlm_session: int | None = None
) -> dict[str, Any]:
    """Per role: processes, RSS (MiB), open fds; totals (the Ray service's; the vLLM server's
    apart: it is restarted as a fault); the database's connections."""
    processes = {pid: role_of(cmd) for pid, cmd in session_processes(service.process.pid).items()}
    if pg_data_dir is not None:
        processes.update(postgres_processes(pg_data_dir))
    if vlm_session is not None:
        processes.update({pid: "vllm:" + role_of(cmd) for pid, cmd in session_processes(vlm_session).items()})
    roles: dict[str, dict[str, Any]] = {}
    for pid, role in processes.items():
        figures = process_figures(pid)
        if figures is None:
            continue
        row = roles.setdefault(role, {"processes": 0, "rss_mib": 0.0, "fds": 0})
        row["processes"] += 1
        row["rss_mib"] = round(row["rss_mib"] + figures[0], 1)
        row["fds"] += figures[1] or 0
    service_roles = [
        row for role, row in roles.items() if role != "postgres" and not role.startswith("vllm:")
    ]
    vllm_roles = [row for role, row in roles.items() if role.startswith("vllm:")]
    rows = database_connections(service.dsn)
    live = {pid: role for pid, role in processes.items() if process_figures(pid) is not None}
    connections = None if rows is None else connections_by_owner(rows, live)
    return {
        "at": time.time(),
        "roles": dict(sorted(roles.items())),
        "service_rss_mib": round(sum(r["rss_mib"] for r in service_roles), 1),
        "service_fds": sum(r["fds"] for r in service_roles),
        "vllm_rss_mib": round(sum(r["rss_mib"] for r in vllm_roles), 1) if vlm_session is not None else None,
        "vllm_fds": sum(r["fds"] for r in vllm_roles) if vlm_session is not None else None,
        "db_connections": sum(n for _, _, n in rows) if rows is not None else None,
        "db_connections_by_state": connections["by_state"] if connections else None,
        "db_connections_by_owner": connections,
    }


def growth(warm: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """End against after-warm-up: totals and each role present in both (fraction, None if 0)."""

    def ratio(before: float | None, after: float | None) -> float | None:
        if before in (None, 0) or after is None:
            return None
        return round(after / before - 1.0, 3)

    totals = {
        name: ratio(warm[name], end[name]) for name in ("service_rss_mib", "service_fds", "db_connections")
    }
    roles = {
        role: {
            "rss": ratio(row["rss_mib"], end["roles"][role]["rss_mib"]),
            "fds": ratio(row["fds"], end["roles"][role]["fds"]),
        }
        for role, row in warm["roles"].items()
        if role in end["roles"]
    }
    within = all(value is None or value <= GROWTH_LIMIT for value in totals.values())
    return {"totals": totals, "roles": roles, "limit": GROWTH_LIMIT, "within_limit": within}
