"""The soak's faults on their schedule: PostgreSQL restarted, replicas killed, the vLLM server
killed (soak_vlm.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from evals.benchmarks.soak_options import REPLICA_OF_FAULT
from evals.benchmarks.soak_service import SoakService
from evals.benchmarks.soak_vlm import (
    VlmServerFault,
)

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
