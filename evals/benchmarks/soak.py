"""``visionroute bench soak``: the service under mixed traffic while faults are injected.

One run: a throwaway PostgreSQL (visionroute/pg_local.py; or the caller's) holds every durable
store; ``serve run`` starts the service on it (two ingress replicas, search replicas following
the store, a budget on one tenant, durable search indexing so an analysed image's search id is
a promise). Client threads drive HTTP and gRPC through the project's client
(visionroute/client): analyse, batch (HTTP), search, index writes, review claims and labels,
each logical call retried with its one request id after a 503/429 Retry-After, as a caller would.
Faults on a schedule after the warm-up: PostgreSQL restarted, an ingress replica's process
killed (SIGKILL, as a crash or the OOM killer does; Ray restarts it), a search replica killed;
with ``--vlm``, a VLM tier on a real vLLM server whose process group is killed and restarted
(evals/benchmarks/soak_vlm.py).

Reported: every attempt by status (allowed: 200, 4xx, 429, 503 with Retry-After; anything else
listed, and marked when it was in flight at a replica kill), acknowledged items lost (review
items, search entries, labels), duplicate review items, budget overspend, and per process RSS,
open file descriptors and database connections at start, after the warm-up and at the end.
docs/soak.md says how to read it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evals.benchmarks.soak_images import noise_png
from evals.benchmarks.soak_vlm import (
    VLM_MIX,
    VLM_TASK,
    VlmServerFault,
    format_vlm,
    vlm_cascade,
    vlm_outcome,
    vlm_summary,
)

REPO = Path(__file__).resolve().parents[2]
APP = "visionroute"
FAULTS = ("postgres", "ingress", "search")  # the default rotation
KNOWN_FAULTS = (*FAULTS, "vlm")  # vlm: only with the VLM tier (--vlm; evals/benchmarks/soak_vlm.py)
REPLICA_OF_FAULT = {"ingress": "Ingress", "search": "search"}
METERED_TENANT = "soak-metered"
BUDGET_NAME = "soak-metered"
BUDGET_WINDOW_S = 366 * 86400  # one window for the whole run (windows are epoch-aligned)
GROWTH_LIMIT = 0.10
# (operation, face, weight): the traffic mix; a review round is a claim and its label
MIX = (
    ("analyze", "http", 3),
    ("analyze", "grpc", 3),
    ("batch", "http", 1),
    ("search", "http", 1),
    ("search", "grpc", 1),
    ("index", "http", 0.5),
    ("index", "grpc", 0.5),
    ("review", "http", 1),
    ("review", "grpc", 1),
)
BATCH_IMAGES = 4


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 30.0
    rate_per_s: float = 4.0  # logical calls per second, all clients together
    clients: int = 4
    faults: tuple[str, ...] = FAULTS
    fault_every_s: float = 60.0
    ingress_replicas: int = 2
    search_replicas: int = 2
    budget_cap_units: float = 20.0
    seed: int = 0
    vlm: bool = False  # a VLM tier on a real vLLM server the soak starts (soak_vlm.py)

    def __post_init__(self) -> None:
        from visionroute.errors import ConfigError

        if not self.minutes > 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes!r}", field="minutes")
        if not self.rate_per_s > 0 or self.clients < 1:
            raise ConfigError(
                f"rate must be > 0 and clients >= 1, got {self.rate_per_s}, {self.clients}", field="rate"
            )
        unknown = sorted(set(self.faults) - set(KNOWN_FAULTS))
        if unknown:
            raise ConfigError(
                f"unknown faults {unknown}; expected some of {list(KNOWN_FAULTS)}", field="faults"
            )
        if "vlm" in self.faults and not self.vlm:
            raise ConfigError("the vlm fault needs the VLM tier (vlm=True, --vlm)", field="faults")
        if "ingress" in self.faults and self.ingress_replicas < 2:
            raise ConfigError(
                "killing an ingress replica needs ingress_replicas >= 2", field="ingress_replicas"
            )

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return min(60.0, max(10.0, 0.1 * self.duration_s))

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds after the start, fault): spread evenly between the warm-up and a quiet tail,
        the kinds in turn, at least one of each."""
        if not self.faults:
            return []
        tail = max(10.0, 0.05 * self.duration_s)
        window = self.duration_s - self.warmup_s - tail
        count = max(len(self.faults), int(window // self.fault_every_s))
        return [
            (self.warmup_s + window * (i + 0.5) / count, self.faults[i % len(self.faults)])
            for i in range(count)
        ]


# -- the service ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soak_document(
    models_dir: Path, workdir: Path, options: SoakOptions, vlm_endpoint: str | None = None
) -> dict[str, Any]:
    """The shipped serve_config.yaml with the soak's state, replicas, budget and indexing; with
    ``vlm_endpoint``, a second task whose escalations go to the VLM there."""
    import yaml

    document = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    document["http_options"]["port"] = _free_port()
    document["grpc_options"]["port"] = _free_port()
    args = document["applications"][0]["args"]
    classify = args["cascades"]["classify"]
    classify["num_cpus"] = 0.25
    # random-noise images land between the thresholds: every analysed image is a review item
    classify["policy"] = {**classify["policy"], "accept_threshold": 0.99, "escalate_threshold": 0.0}
    args["cascades"] = {"classify": classify}  # the text tier adds start time, not faults
    if vlm_endpoint is not None:
        args["cascades"][VLM_TASK] = vlm_cascade(classify, vlm_endpoint)
    args["models_dir"] = str(models_dir)
    args["review"] = {"path": str(workdir / "review"), "lease_s": 60}
    args["state"] = {"backend": "postgres", "connect_timeout_s": 3}
    args["policies"] = {
        "version": "soak-v1",
        "budgets": [
            {
                "name": BUDGET_NAME,
                "tenant": METERED_TENANT,
                "tiers": ["onnx"],
                "window_s": BUDGET_WINDOW_S,
                "cap_units": options.budget_cap_units,
            }
        ],
    }
    retrieval = args["retrieval"]
    retrieval["index_dir"] = str(workdir / "index")
    retrieval["index"] = {"max_staleness_s": 1.0}
    # durable: an analysed image's search id is promised, so a lost one shows
    retrieval["index_queue"] = {"mode": "durable", "max_pending": 1024, "max_batch": 32}
    args["ingress_replicas"] = options.ingress_replicas
    args["ingress_num_cpus"] = 0.25
    args["search_replicas"] = options.search_replicas
    args["search_num_cpus"] = 0.25
    return document


class SoakService:
    """``serve run`` of the soak config in its own session (its pid is the session id every
    replica process carries), on the given PostgreSQL database."""

    def __init__(
        self, models_dir: Path, workdir: Path, dsn: str, options: SoakOptions, vlm_endpoint: str | None = None
    ) -> None:
        import yaml

        self.workdir = workdir
        self.dsn = dsn
        document = soak_document(models_dir, workdir, options, vlm_endpoint)
        self.http_port = document["http_options"]["port"]
        self.grpc_port = document["grpc_options"]["port"]
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.config_path = workdir / "soak_config.yaml"
        self.config_path.write_text(yaml.safe_dump(document))
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> SoakService:
        from router.serve_runner import _preexec, child_environment, ready

        env, _ = child_environment(
            {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        )
        env.pop("RAY_ADDRESS", None)
        env.update(
            {
                "RAY_ADDRESS": "local",  # its own Ray: never a cluster another run left on this machine
                "VISIONROUTE_PG_DSN": self.dsn,
                "VISIONROUTE_HOME": str(self.workdir / "home"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            }
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("serve")), "run", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_preexec,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not ready(self.url + "/readyz"):
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the soak service was not ready after {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(1.0)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # serve run and the local Ray it started
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(text[-lines:])

    def replica_pids(self, deployment: str) -> list[int]:
        return sorted(
            pid
            for pid, cmdline in session_processes(self.process.pid).items()
            if f"ServeReplica:{APP}:" in cmdline and role_of(cmdline) == f"replica:{deployment}"
        )


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


def database_connections(dsn: str) -> dict[str, int] | None:
    """The service's connections to its database by state (idle, active, ...); None if unreachable."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT COALESCE(state, 'unknown'), COUNT(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1"
            ).fetchall()
        return {state: int(n) for state, n in rows}
    except psycopg.Error:
        return None


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
    connections = database_connections(service.dsn)
    return {
        "at": time.time(),
        "roles": dict(sorted(roles.items())),
        "service_rss_mib": round(sum(r["rss_mib"] for r in service_roles), 1),
        "service_fds": sum(r["fds"] for r in service_roles),
        "vllm_rss_mib": round(sum(r["rss_mib"] for r in vllm_roles), 1) if vlm_session is not None else None,
        "vllm_fds": sum(r["fds"] for r in vllm_roles) if vlm_session is not None else None,
        "db_connections": sum(connections.values()) if connections is not None else None,
        "db_connections_by_state": connections,
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


# -- traffic ---------------------------------------------------------------------------------------


@dataclass
class Attempt:
    op: str
    face: str
    status: int | str  # the HTTP status (gRPC: the same refusal's), or "no answer"
    started: float
    ended: float
    retry_after: bool
    reason: str = ""


@dataclass
class Ledger:
    """Everything the traffic saw and was promised (thread-safe appends)."""

    attempts: list[Attempt] = field(default_factory=list)
    review_items: dict[str, tuple[str, str]] = field(default_factory=dict)  # item id -> (tenant, request id)
    search_ids: set[int] = field(default_factory=set)
    labelled: set[str] = field(default_factory=set)
    metered_units: float = 0.0
    calls: Counter = field(default_factory=Counter)  # (op, face, outcome)
    vlm_outcomes: list[tuple[float, str]] = field(
        default_factory=list
    )  # (s after the start, soak_vlm outcome)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def analysed(self, body: Any, tenant: str) -> None:
        """An acknowledged analysis: its review item and its (durable) search entry."""
        with self.lock:
            if body.review_item_id:
                self.review_items[body.review_item_id] = (tenant, body.request_id)
            for step in body.trace.get("steps", []):
                if step.get("stage") == "retrieval:index" and (step.get("details") or {}).get("search_id"):
                    self.search_ids.add(int(step["details"]["search_id"]))
            if tenant == METERED_TENANT:  # what the budget meters: the cheap tier's calls
                steps = body.trace.get("steps", [])
                self.metered_units += sum(
                    float(s.get("cost_units") or 0) for s in steps if str(s.get("stage")).startswith("onnx")
                )


class Traffic:
    """``clients`` threads, each with an HTTP and a gRPC client, at ``rate_per_s`` calls in all."""

    def __init__(self, service: SoakService, options: SoakOptions, ledger: Ledger, started: float) -> None:
        self.service = service
        self.options = options
        self.ledger = ledger
        self.started = started
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.seeds = iter(range(options.seed * 10_000_000, (options.seed + 1) * 10_000_000))
        self.seed_lock = threading.Lock()

    def next_seed(self) -> int:
        with self.seed_lock:
            return next(self.seeds)

    def start(self) -> None:
        for n in range(self.options.clients):
            thread = threading.Thread(target=self._client, args=(n,), name=f"soak-client-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _client(self, n: int) -> None:
        from visionroute.client import NO_RETRY, VisionRouteClient

        rng = random.Random(self.options.seed * 1000 + n)
        mix = MIX + VLM_MIX if self.options.vlm else MIX
        ops, weights = [(op, face) for op, face, _ in mix], [w for *_, w in mix]
        interval = self.options.clients / self.options.rate_per_s
        clients = {
            "http": VisionRouteClient(self.service.url, timeout_s=30, retry=NO_RETRY),
            "grpc": VisionRouteClient(self.service.grpc_url, timeout_s=30, retry=NO_RETRY),
        }
        next_at = time.monotonic() + rng.random() * interval
        try:
            while not self.stop.is_set():
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = max(next_at + interval, time.monotonic())  # never a burst to catch up
                op, face = rng.choices(ops, weights)[0]
                try:
                    getattr(self, f"_{op}")(clients[face], face, rng)
                except Exception as error:  # a bug in the soak itself: recorded, never silent
                    self.ledger.add(
                        Attempt(op, face, f"soak error {type(error).__name__}", 0, 0, False, str(error))
                    )
        finally:
            for client in clients.values():
                client.close()

    def _call(self, op: str, face: str, send, *, idempotent: bool = True, attempts: int = 6) -> Any:
        """One logical call: each attempt recorded; a 503 (or a short 429) is retried after its
        Retry-After, a lost answer only when ``idempotent`` (the same request id every time)."""
        from visionroute.client import ServiceError, ServiceUnreachable

        request_id = uuid.uuid4().hex
        outcome: Any = "gave up"
        for _ in range(attempts):
            started = time.monotonic()
            try:
                result = send(request_id)
            except ServiceUnreachable as error:
                self.ledger.add(
                    Attempt(op, face, "no answer", started, time.monotonic(), False, error.reason[:160])
                )
                if not idempotent or self.stop.is_set():
                    outcome = "no answer"
                    break
                time.sleep(1.0)
                continue
            except ServiceError as error:
                status = error.status if error.status is not None else f"error {error.error}"
                wait = error.retry_after_s
                self.ledger.add(
                    Attempt(op, face, status, started, time.monotonic(), wait is not None, error.reason[:160])
                )
                outcome = status
                if status in (503, 429) and wait is not None and wait <= 5 and not self.stop.is_set():
                    time.sleep(min(wait, 2.0))
                    continue
                break
            self.ledger.add(Attempt(op, face, 200, started, time.monotonic(), False))
            with self.ledger.lock:
                self.ledger.calls[(op, face, "200")] += 1
            return result
        with self.ledger.lock:
            self.ledger.calls[(op, face, str(outcome))] += 1
        return None

    def _analyze(self, client, face: str, rng: random.Random) -> None:
        tenant = METERED_TENANT if rng.random() < 0.15 else f"soak-{rng.randrange(4)}"
        image = noise_png(self.next_seed())
        body = self._call("analyze", face, lambda rid: client.analyze(image, tenant=tenant, request_id=rid))
        if body is not None:
            self.ledger.analysed(body, tenant)

    def _analyze_vlm(self, client, face: str, rng: random.Random) -> None:
        """An analysis on the VLM task: a VLM answer, or (VLM down) a recorded review item."""
        tenant = f"soak-{rng.randrange(4)}"
        image = noise_png(self.next_seed())
        body = self._call(
            "analyze_vlm",
            face,
            lambda rid: client.analyze(image, task=VLM_TASK, tenant=tenant, request_id=rid),
        )
        if body is not None:
            self.ledger.analysed(body, tenant)
            with self.ledger.lock:
                self.ledger.vlm_outcomes.append((time.monotonic() - self.started, vlm_outcome(body)))

    def _batch(self, client, face: str, rng: random.Random) -> None:
        from router.schemas import AnalyzeResponse

        tenant = f"soak-{rng.randrange(4)}"
        files = [
            ("image", (f"{i}.png", noise_png(self.next_seed()), "image/png")) for i in range(BATCH_IMAGES)
        ]
        body = self._call(
            "batch",
            face,
            lambda rid: client.call(
                "POST", "/v1/analyze/batch", files=files, data={"tenant": tenant}, request_id=rid
            ),
        )
        if body is None:
            return
        for result in body["results"]:  # each image's own outcome (a 503 image is not retried here)
            if result["status"] == 200:
                self.ledger.analysed(AnalyzeResponse.model_validate(result["response"]), tenant)
            with self.ledger.lock:
                self.ledger.calls[("batch image", face, str(result["status"]))] += 1

    def _search(self, client, face: str, rng: random.Random) -> None:
        if rng.random() < 0.5:
            self._call("search", face, lambda rid: client.search("a photo of noise", k=5, request_id=rid))
        else:
            image = noise_png(self.next_seed())
            self._call("search", face, lambda rid: client.search(image=image, k=5, request_id=rid))

    def _index(self, client, face: str, rng: random.Random) -> None:
        image = noise_png(self.next_seed())
        metadata = {"tenant": f"soak-{rng.randrange(4)}", "tags": ["soak"]}
        added = self._call(
            "index", face, lambda rid: client.index_item(image, metadata, request_id=rid), idempotent=False
        )
        if added is not None:
            with self.ledger.lock:
                self.ledger.search_ids.add(int(added.id))

    def _review(self, client, face: str, rng: random.Random) -> None:
        reviewer = f"soak-reviewer-{rng.randrange(3)}"
        claim = self._call(
            "claim", face, lambda rid: client.claim(reviewer, request_id=rid), idempotent=False
        )
        if claim is None or claim.item is None:
            return
        item_id, token = claim.item.id, claim.lease_token
        labelled = self._call(
            "label",
            face,
            lambda rid: client.label(
                item_id, lease_token=token, verdict="confirm", reviewer=reviewer, request_id=rid
            ),
        )
        if labelled is not None:
            with self.ledger.lock:
                self.ledger.labelled.add(item_id)


# -- faults ----------------------------------------------------------------------------------------


class Faults:
    """Injects the scheduled faults in a thread; each event: when, what, and how long until the
    service had what it had before (a replica count back, PostgreSQL answering)."""

    def __init__(
        self,
        service: SoakService,
        pg: Any,
        schedule: list[tuple[float, str]],
        started: float,
        vlm: VlmServerFault | None = None,
    ) -> None:
        self.service = service
        self.vlm = vlm
        self.pg = pg
        self.schedule = schedule
        self.started = started
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def kill_times(self) -> list[float]:
        return [e["at_monotonic"] for e in self.events if e["fault"] in REPLICA_OF_FAULT and e.get("pid")]

    def _run(self) -> None:
        for at_s, fault in self.schedule:
            if self.stop.wait(max(0.0, self.started + at_s - time.monotonic())):
                return
            event = {
                "fault": fault,
                "at_s": round(time.monotonic() - self.started, 1),
                "at_monotonic": time.monotonic(),
            }
            try:
                if fault == "postgres":
                    self.pg.restart(down_s=4.0)
                    event["recovered_after_s"] = round(time.monotonic() - event["at_monotonic"], 1)
                elif fault == "vlm":
                    self.vlm.inject(event, self.started)  # restarts in the background: minutes
                else:
                    self._kill_replica(REPLICA_OF_FAULT[fault], event)
            except Exception as error:  # reported: a fault that did not happen is not a pass
                event["error"] = f"{type(error).__name__}: {error}"
            self.events.append(event)

    def _kill_replica(self, deployment: str, event: dict[str, Any]) -> None:
        before = self.service.replica_pids(deployment)
        if not before:
            raise RuntimeError(f"no {deployment} replica process found")
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        event["pid"] = victim
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.stop.is_set():
            now = set(self.service.replica_pids(deployment))
            if victim not in now and len(now) >= len(before):
                event["recovered_after_s"] = round(time.monotonic() - event["at_monotonic"], 1)
                return
            time.sleep(0.5)


# -- the checks after the run ----------------------------------------------------------------------


def _sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(query, params).fetchall()


def verify(dsn: str, ledger: Ledger, cap_units: float) -> dict[str, Any]:
    """What was acknowledged against what the stores hold now."""
    review_ids = list(ledger.review_items)
    stored = {
        row[0]: (row[1], row[2], row[3])
        for row in _sql(
            dsn,
            "SELECT id, tenant, request_id, status FROM visionroute_review.items WHERE id = ANY(%s)",
            review_ids,
        )
    }
    lost_review = sorted(set(review_ids) - set(stored))
    wrong_owner = sorted(i for i, key in ledger.review_items.items() if i in stored and stored[i][:2] != key)
    request_ids = sorted({request_id for _, request_id in ledger.review_items.values()})
    duplicates = _sql(
        dsn,
        "SELECT tenant, request_id, COUNT(*) FROM visionroute_review.items WHERE request_id = ANY(%s)"
        " GROUP BY tenant, request_id, kind HAVING COUNT(*) > 1",
        request_ids,
    )
    found_search = {
        row[0]
        for row in _sql(
            dsn, "SELECT id FROM visionroute_search.items WHERE id = ANY(%s)", sorted(ledger.search_ids)
        )
    }
    lost_search = sorted(ledger.search_ids - found_search)
    label_status = dict(
        _sql(
            dsn, "SELECT id, status FROM visionroute_review.items WHERE id = ANY(%s)", sorted(ledger.labelled)
        )
    )
    lost_labels = sorted(i for i in ledger.labelled if label_status.get(i) != "labelled")
    charged, reservations = _sql(
        dsn,
        "SELECT COALESCE(SUM(units), 0), COUNT(*) FROM visionroute_budgets.reservations WHERE budget = %s",
        BUDGET_NAME,
    )[0]
    charged = float(charged)
    return {
        "acknowledged": {
            "review_items": len(review_ids),
            "search_entries": len(ledger.search_ids),
            "labels": len(ledger.labelled),
        },
        "lost": {
            "review_items": lost_review + wrong_owner,
            "search_entries": lost_search,
            "labels": lost_labels,
        },
        "lost_total": len(lost_review) + len(wrong_owner) + len(lost_search) + len(lost_labels),
        "duplicate_review_items": [list(row) for row in duplicates],
        "budget": {
            "cap_units": cap_units,
            "ledger_units": charged,
            "reservations": int(reservations),
            "acknowledged_units": round(ledger.metered_units, 3),
            "overspend_units": round(max(0.0, charged - cap_units, ledger.metered_units - cap_units), 3),
        },
    }


def statuses(ledger: Ledger, kill_times: list[float]) -> dict[str, Any]:
    """Attempts by status; the disallowed ones listed, each marked when it was in flight at a
    replica kill (sent before, answered after: what a request on a killed replica gets)."""
    by_status = Counter(str(a.status) for a in ledger.attempts)
    unexpected = []
    for a in ledger.attempts:
        allowed = (
            a.status == 200
            or (isinstance(a.status, int) and 400 <= a.status < 500)
            or (a.status == 503 and a.retry_after)
        )
        if allowed:
            continue
        in_flight = any(a.started <= t <= a.ended for t in kill_times)
        unexpected.append(
            {
                "op": a.op,
                "face": a.face,
                "status": str(a.status),
                "in_flight_at_kill": in_flight,
                "reason": a.reason,
            }
        )
    return {
        "attempts": len(ledger.attempts),
        "by_status": dict(sorted(by_status.items())),
        "retry_after_missing_on_503": sum(
            1 for a in ledger.attempts if a.status == 503 and not a.retry_after
        ),
        "not_allowed": unexpected,
        "not_allowed_unexplained": [u for u in unexpected if not u["in_flight_at_kill"]],
        "calls": {f"{op} {face} {outcome}": n for (op, face, outcome), n in sorted(ledger.calls.items())},
    }


# -- one run ---------------------------------------------------------------------------------------


def wait_until_serving(service: SoakService, deadline_s: float = 180.0) -> float:
    """Seconds until the service answers a review listing and a search with 200 again."""
    import httpx

    started = time.monotonic()
    checks = (
        ("GET", "/v1/review/items", {"params": {"limit": 1}}),
        ("POST", "/v1/search", {"json": {"text": "x", "k": 1}}),
    )
    for method, path, options in checks:
        while True:
            try:
                if httpx.request(method, service.url + path, timeout=30, **options).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > deadline_s:
                raise RuntimeError(f"the service did not serve {method} {path} within {deadline_s:g} s")
            time.sleep(1.0)
    return time.monotonic() - started


def warm_up_analysis(service: SoakService, deadline_s: float = 300.0) -> None:
    """One analysis over each face until it is served: the first pays the cheap tier's and the
    index writer's first calls, which would otherwise stall the traffic's first seconds."""
    from visionroute.client import RetryPolicy, VisionRouteClient

    retry = RetryPolicy(attempts=30, backoff_s=1.0, max_retry_after_s=10.0)
    for url in (service.url, service.grpc_url):
        with VisionRouteClient(url, timeout_s=deadline_s, retry=retry) as client:
            client.analyze(noise_png(2**31), tenant="soak-warm-up")


def run_soak(
    options: SoakOptions, *, models_dir: Path, workdir: Path, pg: Any, dsn: str, log=print
) -> dict[str, Any]:
    """Start the service on ``dsn`` (a database on ``pg``, a ``LocalPostgres``: restarted as a
    fault), run the traffic and the faults for ``options.minutes``, check, stop; the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    boot = time.monotonic()
    vlm = None
    if options.vlm:
        vlm = VlmServerFault.start()  # minutes on a loaded machine: before the service's clock
        log(f"soak: vLLM server warm in {time.monotonic() - boot:.0f} s at {vlm.endpoint}")
    service = SoakService(models_dir, workdir, dsn, options, vlm.endpoint if vlm else None)
    pg_data = Path(pg.dir) / "db" if getattr(pg, "dir", None) else None

    def snapshot() -> dict[str, Any]:
        return resource_snapshot(service, pg_data, vlm.session_id() if vlm else None)

    try:
        service.start()
        log(f"soak: service ready in {time.monotonic() - boot:.0f} s at {service.url} ({service.grpc_url})")
        wait_until_serving(service)
        warm_up_analysis(service)
        snapshots = {"start": snapshot()}
        ledger = Ledger()
        started = time.monotonic()
        schedule = options.schedule()
        traffic = Traffic(service, options, ledger, started)
        faults = Faults(service, pg, schedule, started, vlm)
        traffic.start()
        faults.thread.start()
        log(
            f"soak: {options.minutes:g} min at {options.rate_per_s:g} calls/s; faults at {[(round(t), f) for t, f in schedule]}"
        )
        time.sleep(options.warmup_s)
        snapshots["after_warmup"] = snapshot()
        while time.monotonic() - started < options.duration_s:
            time.sleep(min(10.0, options.duration_s - (time.monotonic() - started)) or 0.1)
            done = len(ledger.attempts)
            log(
                f"soak: {time.monotonic() - started:5.0f} s, {done} attempts, faults so far {[e['fault'] for e in faults.events]}"
            )
        traffic.finish()
        faults.stop.set()
        faults.thread.join(timeout=150)
        ran_s = time.monotonic() - started
        settle_s = wait_until_serving(service)
        if vlm is not None:
            vlm.wait_restarted(600.0)  # the end snapshot counts the vLLM server that is back
        snapshots["end"] = snapshot()
        checks = verify(dsn, ledger, options.budget_cap_units)
        report = {
            "options": {**options.__dict__, "faults": list(options.faults)},
            "service_start_s": round(started - boot, 1),
            "ran_s": round(ran_s, 1),
            "settled_after_s": round(settle_s, 1),
            "faults": [{k: v for k, v in e.items() if k != "at_monotonic"} for e in faults.events],
            "faults_not_run": {} if vlm else {"vlm": "no VLM tier in this run (--vlm adds it)"},
            "statuses": statuses(ledger, faults.kill_times()),
            "vlm": vlm_summary(ledger.vlm_outcomes, faults.events, ran_s) if vlm else None,
            **checks,
            "resources": snapshots,
            "growth_after_warmup": growth(snapshots["after_warmup"], snapshots["end"]),
        }
        return report
    finally:
        service.stop()
        if vlm is not None:
            vlm.stop()


def format_report(report: dict[str, Any]) -> str:
    s = report["statuses"]
    lines = [
        f"soak: {report['ran_s']:.0f} s of traffic, {s['attempts']} attempts; faults: "
        + ", ".join(
            f"{e['fault']}@{e['at_s']:.0f}s"
            + (f" (back in {e['recovered_after_s']:.0f} s)" if "recovered_after_s" in e else "")
            + (f" ERROR {e['error']}" if "error" in e else "")
            + (" (skipped: the last restart not ready)" if "skipped" in e else "")
            for e in report["faults"]
        ),
        "",
        f"{'status':>14} {'attempts':>9}",
        *(f"{status:>14} {count:>9}" for status, count in s["by_status"].items()),
        f"not allowed: {len(s['not_allowed'])} ({len(s['not_allowed_unexplained'])} not in flight at a replica kill);"
        f" 503 without Retry-After: {s['retry_after_missing_on_503']}",
        *(f"  {u}" for u in s["not_allowed"][:20]),
        "",
        f"acknowledged: {report['acknowledged']}; lost: {report['lost_total']}"
        + (f" {report['lost']}" if report["lost_total"] else ""),
        f"duplicate review items: {len(report['duplicate_review_items'])}",
        "budget: cap {cap_units:g}, ledger {ledger_units:g} units in {reservations} reservations,"
        " acknowledged {acknowledged_units:g}; overspend {overspend_units:g}".format(**report["budget"]),
        "",
        f"{'role':<24} {'start MiB/fds':>15} {'warm MiB/fds':>15} {'end MiB/fds':>15} {'growth rss/fds':>15}",
    ]
    snaps, grow = report["resources"], report["growth_after_warmup"]
    roles = sorted(set().union(*(snap["roles"] for snap in snaps.values())))

    def cell(snap: dict[str, Any], role: str) -> str:
        row = snap["roles"].get(role)
        return f"{row['rss_mib']:.0f}/{row['fds']}" if row else "-"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:+.0f}%"

    for role in roles:
        g = grow["roles"].get(role, {})
        lines.append(
            f"{role:<24} {cell(snaps['start'], role):>15} {cell(snaps['after_warmup'], role):>15}"
            f" {cell(snaps['end'], role):>15} {pct(g.get('rss')) + '/' + pct(g.get('fds')):>15}"
        )
    t = grow["totals"]
    lines.append(
        f"{'service total':<24} "
        + " ".join(
            f"{snaps[k]['service_rss_mib']:.0f}/{snaps[k]['service_fds']:>5}".rjust(15)
            for k in ("start", "after_warmup", "end")
        )
        + f" {pct(t['service_rss_mib']) + '/' + pct(t['service_fds']):>15}"
    )
    lines.append(
        f"{'db connections':<24} "
        + " ".join(f"{snaps[k]['db_connections']}".rjust(15) for k in ("start", "after_warmup", "end"))
        + f" {pct(t['db_connections']):>15}"
    )
    lines.append(
        "db connections by state: "
        + "; ".join(f"{k} {snaps[k]['db_connections_by_state']}" for k in ("start", "after_warmup", "end"))
    )
    if snaps["start"].get("vllm_rss_mib") is not None:
        lines.append(
            f"{'vLLM server total':<24} "
            + " ".join(
                f"{snaps[k]['vllm_rss_mib']:.0f}/{snaps[k]['vllm_fds']:>5}".rjust(15)
                for k in ("start", "after_warmup", "end")
            )
            + "  (restarted as a fault: end is a new process)"
        )
    lines.append(f"growth after warm-up within {100 * grow['limit']:.0f}%: {grow['within_limit']}")
    if report.get("vlm"):
        lines += ["", *format_vlm(report["vlm"])]
    return "\n".join(lines)


def run(args) -> int:
    import logging

    from visionroute import pg_local
    from visionroute.errors import ConfigError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the report
    models_dir = Path(args.models_dir)
    if not models_dir.is_dir() or not any(models_dir.iterdir()):
        raise ConfigError(
            f"no prepared models in {models_dir}; run `visionroute models prepare`", field="models_dir"
        )
    options = SoakOptions(
        minutes=args.minutes,
        rate_per_s=args.rate,
        clients=args.clients,
        faults=tuple(f for f in args.faults.split(",") if f)
        + (("vlm",) if args.vlm and args.faults == ",".join(FAULTS) else ()),
        vlm=args.vlm,
        fault_every_s=args.fault_every_s,
        search_replicas=args.search_replicas,
        budget_cap_units=args.budget_cap_units,
        seed=args.seed,
    )
    workdir = Path(args.work_dir) if args.work_dir else Path(tempfile_dir())
    reason = pg_local.available()
    if reason:
        raise ConfigError(f"the soak needs a local PostgreSQL: {reason}", field="postgres")
    with pg_local.LocalPostgres() as pg:
        report = run_soak(
            options, models_dir=models_dir, workdir=workdir, pg=pg, dsn=pg.create_database("soak")
        )
    print(format_report(report))
    out = Path(args.json) if args.json else workdir / "soak.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"figures: {out}")
    s = report["statuses"]
    healthy = (
        not s["not_allowed_unexplained"]
        and report["lost_total"] == 0
        and not report["duplicate_review_items"]
        and report["budget"]["overspend_units"] == 0
        and not any("error" in e for e in report["faults"])
        and (report["vlm"] is None or report["vlm"]["healthy"])
    )
    return 0 if healthy else 1


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="visionroute-soak-")


def register(bench) -> None:
    soak = bench.add_parser(
        "soak", help="mixed HTTP/gRPC traffic under faults (PostgreSQL restart, replica kills): losses, leaks"
    )
    soak.add_argument("--minutes", type=float, default=30.0, help="traffic time (default: %(default)s)")
    soak.add_argument("--rate", type=float, default=4.0, help="calls per second, all clients together")
    soak.add_argument("--clients", type=int, default=4)
    soak.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma list of {', '.join(KNOWN_FAULTS)} (empty: none; vlm needs --vlm)",
    )
    soak.add_argument(
        "--vlm",
        action="store_true",
        help="add a VLM tier on the tiny local vLLM server (started here) and the vlm fault to the rotation",
    )
    soak.add_argument("--fault-every-s", type=float, default=60.0, help="seconds between faults (about)")
    soak.add_argument("--search-replicas", type=int, default=2)
    soak.add_argument("--budget-cap-units", type=float, default=20.0, help="the metered tenant's budget")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--models-dir", default=None, help="prepared models (default: VISIONROUTE_HOME's)")
    soak.add_argument("--work-dir", default=None, help="config, logs, review store (default: a temp dir)")
    soak.add_argument("--json", help="the report as JSON here (default: WORK_DIR/soak.json)")
    soak.set_defaults(func=_run_with_defaults)


def _run_with_defaults(args) -> int:
    from visionroute import paths

    if args.models_dir is None:
        args.models_dir = str(paths.models_dir())
    return run(args)
