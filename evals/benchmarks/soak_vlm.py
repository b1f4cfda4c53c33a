"""The soak's VLM tier and its fault: a real tiny LLaVA under vLLM (CPU), killed and restarted.

With ``--vlm`` the soak starts the project's tiny vLLM server (examples/vllm_server.py), adds a
cascade ``classify_vlm`` whose noise images all escalate to it, sends a share of the analyses to
that task, and puts ``vlm`` in the fault rotation: the server's process group gets SIGKILL (what
a crash or the OOM killer does), and a new server is started on the same port in the
background (readiness takes minutes here, so the other faults go on meanwhile).

Every VLM-task answer is classified: a VLM answer (a ``vlm`` step without error), a VLM-down
fallback (a ``vlm`` step with an error and the analysis a recorded review item), or a
violation (a failed VLM step with no review item, or no ``vlm`` step at all). The report counts
them per phase: before the first kill, each outage (kill -> ready) and each time up again.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

VLM_TASK = "classify_vlm"
VLM_LABELS = ["cat", "dog", "coffee cup", "rocket", "astronaut"]
# (operation, face, weight) added to the soak's mix: about 8% of the calls escalate to the VLM
VLM_MIX = (("analyze_vlm", "http", 0.5), ("analyze_vlm", "grpc", 0.5))


def vlm_cascade(classify: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The soak's classify cascade with a VLM tier: noise lands between the thresholds, so every
    analysis escalates; a valid VLM answer is accepted (a random model is never confident)."""
    return {
        **classify,
        "placement": "ingress",  # one classifier deployment is enough for the soak's CPUs
        "policy": {
            **classify["policy"],
            "version": "soak-vlm-v1",
            "accept_threshold": 0.99,
            "escalate_threshold": 0.0,
        },
        "vlm": {
            "endpoint": endpoint,
            "model": "tiny-llava",
            "labels": VLM_LABELS,
            "accept_threshold": 0.0,
            "disagreement_margin": 1.0,
            "cost_per_1k_prompt_tokens": 0.5,
            "cost_per_1k_completion_tokens": 1.5,
            # inside the soak client's 30 s: a slow answer is a timeout fallback, not a lost call;
            # a dead server fails at once (connection refused, then the open breaker)
            "request_timeout_s": 20.0,
            "total_timeout_s": 24.0,
            "max_attempts": 2,
            "max_concurrency": 2,
            "queue_timeout_s": 5.0,
            "breaker_failure_threshold": 3,
            "breaker_recovery_s": 10.0,
        },
    }


def vlm_outcome(body: Any) -> str:
    """``answer``, ``fallback:<failure>`` (the VLM failed: connection, circuit_open, timeout, ...;
    the analysis is a review item), or what went wrong."""
    steps = body.trace.get("steps", [])
    vlm = next((s for s in steps if s.get("stage") == "vlm"), None)
    if vlm is None:
        return "no vlm step"
    if not vlm.get("error"):
        return "answer"
    if body.decision == "review" and body.review_item_id:
        return "fallback:" + str((vlm.get("details") or {}).get("failure") or "unknown")
    return "failed without review item"


@dataclass
class VlmServerFault:
    """Owns the soak's vLLM server: start, kill -9 of its process group, restart on its port."""

    server: Any = None  # examples.vllm_server.VllmServer
    events: list[dict[str, Any]] = field(default_factory=list)
    restarting: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls) -> VlmServerFault:
        from examples.vllm_server import start_tiny_vllm_server

        server = start_tiny_vllm_server()
        try:
            warm_up(server)
        except BaseException:
            server.stop()
            raise
        return cls(server=server)

    @property
    def endpoint(self) -> str:
        return self.server.base_url

    def session_id(self) -> int | None:
        with self.lock:
            return self.server.process.pid if self.server is not None and self.server.is_running() else None

    def inject(self, event: dict[str, Any], started: float) -> None:
        """Kill now; restart in the background. A kill while the last restart is not ready yet is
        skipped (recorded): the outage would only get longer, not different."""
        if self.restarting is not None and self.restarting.is_alive():
            event["skipped"] = "the previous restart is not ready yet"
            return
        with self.lock:
            old = self.server
            event["pid"] = old.process.pid
            old._signal_group(signal.SIGKILL)  # kill -9 of the process group: API server and engine core
            old.process.wait(timeout=30)
        event["killed_at_s"] = round(time.monotonic() - started, 1)
        self.restarting = threading.Thread(
            target=self._restart, args=(old, event, started), name="soak-vlm-restart", daemon=True
        )
        self.restarting.start()

    def _restart(self, old: Any, event: dict[str, Any], started: float) -> None:
        from examples.vllm_server import start_vllm_server

        begun = time.monotonic()
        try:
            server = start_vllm_server(
                old.model_dir, served_model_name=old.model, python=old.process.args[0], port=old.port
            )
            event["process_ready_after_s"] = round(time.monotonic() - begun, 1)
            event["warm_up_s"] = round(warm_up(server), 1)
            with self.lock:
                self.server = server
            event["ready_at_s"] = round(time.monotonic() - started, 1)
            event["recovered_after_s"] = round(time.monotonic() - begun, 1)
        except Exception as error:  # reported as the fault's error: a server that never came back
            event["error"] = f"restart failed: {type(error).__name__}: {error}"[:2000]

    def wait_restarted(self, timeout_s: float) -> None:
        if self.restarting is not None:
            self.restarting.join(timeout=timeout_s)

    def stop(self) -> None:
        self.wait_restarted(0)
        with self.lock:
            if self.server is not None:
                self.server.stop()


def warm_up(server: Any, deadline_s: float = 600.0) -> float:
    """One chat completion shaped like the tier's (an image, the labels' JSON schema, logprobs)
    until it answers 200: a fresh server's first one is slow (lazy multimodal and grammar set-up),
    and the tier's 20 s timeout would make it a fallback. Returns the seconds it took."""
    import base64

    import httpx

    from evals.benchmarks.soak_images import noise_png

    image = "data:image/png;base64," + base64.b64encode(noise_png(0)).decode("ascii")
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": VLM_LABELS}},
        "required": ["label"],
        "additionalProperties": False,
    }
    request = {
        "model": server.model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": f"Which one is in the image: {', '.join(VLM_LABELS)}?"},
                ],
            }
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}},
        "max_tokens": 16,
        "temperature": 0.0,
        "logprobs": True,
    }
    started = time.monotonic()
    last = "no attempt"
    while time.monotonic() - started < deadline_s:
        if not server.is_running():
            raise RuntimeError(
                f"vLLM server exited during warm-up; log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            response = httpx.post(f"{server.base_url}/chat/completions", json=request, timeout=180)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(1.0)
    raise RuntimeError(f"vLLM server at {server.base_url} not warm after {deadline_s:g} s (last: {last})")


def phases(
    outcomes: list[tuple[float, str]], events: list[dict[str, Any]], ran_s: float
) -> list[dict[str, Any]]:
    """Outcomes (seconds after the start, outcome) counted per phase: ``up`` before the first
    kill, then ``down`` (kill -> ready) and ``up`` again after each restart."""
    kills = [e for e in events if "killed_at_s" in e]
    bounds: list[tuple[str, float, float]] = []
    at = 0.0
    for kill in kills:
        bounds.append(("up", at, kill["killed_at_s"]))
        ready = kill.get("ready_at_s", ran_s)
        bounds.append(("down", kill["killed_at_s"], ready))
        at = ready
    bounds.append(("up", at, max(at, ran_s)))
    rows = []
    for i, (kind, begin, end) in enumerate(bounds):
        last = i == len(bounds) - 1  # the tail phase also takes answers that came after ran_s
        inside = [o for t, o in outcomes if begin <= t and (t < end or last)]
        counts: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        for outcome in inside:
            if outcome.startswith("fallback:"):
                reason = outcome.split(":", 1)[1]
                fallbacks[reason] = fallbacks.get(reason, 0) + 1
            else:
                counts[outcome] = counts.get(outcome, 0) + 1
        first_answer = next(
            (t for t, o in outcomes if begin <= t and (t < end or last) and o == "answer"), None
        )
        rows.append(
            {
                "phase": kind,
                "from_s": round(begin, 1),
                "to_s": round(end, 1),
                "answers": counts.pop("answer", 0),
                "vlm_down_fallbacks": sum(fallbacks.values()),
                "fallback_failures": fallbacks,
                "other": counts,
                "first_answer_after_s": None if first_answer is None else round(first_answer - begin, 1),
            }
        )
    return rows


def vlm_summary(
    outcomes: list[tuple[float, str]], events: list[dict[str, Any]], ran_s: float
) -> dict[str, Any]:
    """Per phase counts and the invariants: no failed escalation without a review item, and an
    answer again in every up phase that saw escalations after a restart."""
    rows = phases(outcomes, events, ran_s)
    violations = sum(sum(row["other"].values()) for row in rows)
    restarts = [row for row in rows[1:] if row["phase"] == "up"]
    no_answer_after_restart = [
        row for row in restarts if row["answers"] == 0 and (row["vlm_down_fallbacks"] or row["other"])
    ]
    return {
        "phases": rows,
        "answers": sum(row["answers"] for row in rows),
        "vlm_down_fallbacks": sum(row["vlm_down_fallbacks"] for row in rows),
        "violations": violations,
        "up_again_without_answer": len(no_answer_after_restart),
        "healthy": violations == 0 and not no_answer_after_restart,
    }


def format_vlm(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"VLM: {summary['answers']} answers, {summary['vlm_down_fallbacks']} VLM-down review fallbacks,"
        f" {summary['violations']} violations, up again without an answer: {summary['up_again_without_answer']}",
        f"{'phase':>6} {'from s':>7} {'to s':>7} {'answers':>8} {'fallbacks':>10} {'1st answer':>11} fallback failures; other",
    ]
    for row in summary["phases"]:
        first = "-" if row["first_answer_after_s"] is None else f"+{row['first_answer_after_s']:.0f}s"
        lines.append(
            f"{row['phase']:>6} {row['from_s']:>7.0f} {row['to_s']:>7.0f} {row['answers']:>8}"
            f" {row['vlm_down_fallbacks']:>10} {first:>11} {row['fallback_failures'] or ''} {row['other'] or ''}"
        )
    return lines
