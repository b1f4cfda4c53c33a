"""The client's retries and errors against small fault-injecting stubs (HTTP and gRPC).

The stubs answer from a script (429/503 with Retry-After, 5xx, a late answer) and record what
each attempt carried: the retries must wait what Retry-After says, resend the call's one request
id (so the service never makes a second review item or charges a budget twice), and stop where
a retry could do harm. The real service is exercised in tests/integration/test_client_service.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from router.schemas import AnalyzeResponse
from visionroute.cli import main
from visionroute.client import (
    AsyncVisionRouteClient,
    RetryPolicy,
    ServiceClient,
    ServiceError,
    ServiceUnreachable,
    VisionRouteClient,
)
from visionroute.client.commands import KEY_HINT
from visionroute.client.grpc_transport import generated
from visionroute.client.http_transport import retry_after_s
from visionroute.errors import BudgetExceeded, ConfigError, InputError, NotFound

FAST = RetryPolicy(backoff_s=0.01, backoff_max_s=0.05)
IMAGE = b"\x89PNG not really: the stubs never decode it"


def analysis_body(request_id: str) -> dict:
    """A well-formed analyse answer (what router/services/analyze/response.py sends)."""
    return {
        "request_id": request_id,
        "task": "classify",
        "decision": "accept",
        "answer": [{"label": "espresso", "class_id": 967, "confidence": 0.9, "xyxy": [0, 0, 8, 8]}],
        "text": None,
        "image": {"sha256": "0" * 64, "width": 8, "height": 8},
        "review_item_id": None,
        "cost_units": 1.0,
        "trace": {"request_id": request_id, "decision": "accept", "cost_units": 1.0, "steps": []},
        "policy_version": "policies-v1",
        "degraded": False,
    }


def error_body(error: str, field: str | None, reason: str) -> dict:
    return {"error": error, "field": field, "reason": reason, "request_id": None}


@dataclass
class Answer:
    status: int = 200
    body: dict | str | None = None  # None on 200: an analyse answer for the request's id
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    at: float
    method: str
    path: str
    request_id: str | None
    api_key: str | None
    user_agent: str | None


class HttpStub:
    """A loopback HTTP server that answers each request with the script's next ``Answer``."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.seen: list[Seen] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                request_id = self.headers.get("x-request-id")
                stub.seen.append(
                    Seen(
                        time.monotonic(),
                        self.command,
                        self.path,
                        request_id,
                        self.headers.get("x-api-key"),
                        self.headers.get("user-agent"),
                    )
                )
                answer = stub.answers.pop(0) if stub.answers else Answer()
                time.sleep(answer.delay_s)
                body = answer.body if answer.body is not None else analysis_body(request_id)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(answer.status)
                    self.send_header(
                        "content-type", "text/plain" if isinstance(body, str) else "application/json"
                    )
                    self.send_header("content-length", str(len(data)))
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (a timeout test)
                    pass

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> HttpStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request_ids(self) -> list[str | None]:
        return [s.request_id for s in self.seen]

    def gaps_s(self) -> list[float]:
        return [b.at - a.at for a, b in zip(self.seen, self.seen[1:])]


def test_429_waits_its_retry_after_and_resends_the_same_request_id():
    busy = Answer(
        429, error_body("BudgetExhausted", "budget:ten", "budget 'ten' is spent"), {"Retry-After": "1"}
    )
    with HttpStub(busy, Answer()) as stub, VisionRouteClient(stub.url, "vr_key", retry=FAST) as client:
        result = client.analyze(IMAGE, task="classify")
    assert isinstance(result, AnalyzeResponse) and result.decision == "accept"
    first, second = stub.request_ids()
    assert first == second == result.request_id and len(first) == 32  # one id, set by the client
    assert stub.gaps_s()[0] >= 0.95  # Retry-After: 1, not the 10 ms backoff
    assert [s.api_key for s in stub.seen] == ["vr_key", "vr_key"] and stub.seen[0].path == "/v1/analyze"


def test_the_async_client_waits_out_503s_with_one_request_id():
    unavailable = Answer(
        503, error_body("BackendUnavailable", "service", "a backend failed"), {"Retry-After": "1"}
    )
    date = Answer(503, "Service Unavailable", {"Retry-After": formatdate(time.time() + 1, usegmt=True)})

    async def scenario(url: str) -> AnalyzeResponse:
        async with AsyncVisionRouteClient(url, retry=FAST) as client:
            return await client.analyze(IMAGE, request_id="caller-chosen-1")

    with HttpStub(unavailable, date, Answer()) as stub:
        result = asyncio.run(scenario(stub.url))
    assert result.request_id == "caller-chosen-1"
    assert stub.request_ids() == ["caller-chosen-1"] * 3
    assert stub.gaps_s()[0] >= 0.95 and stub.gaps_s()[1] >= 0.0  # the HTTP date's wait is < 1 s


def test_a_retry_after_beyond_the_clients_limit_is_raised_at_once_with_the_services_fields():
    spent = Answer(
        429,
        error_body("BudgetExhausted", "budget:ten", "the window resets in 3600 s"),
        {"Retry-After": "3600"},
    )
    with HttpStub(spent) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        with pytest.raises(ServiceError) as raised:
            client.analyze(IMAGE)
    error = raised.value
    assert len(stub.seen) == 1 and error.retry_after_s == 3600
    assert (error.status, error.error, error.field) == (429, "BudgetExhausted", "budget:ten")
    assert error.reason == "the window resets in 3600 s" and error.request_id == stub.request_ids()[0]
    assert isinstance(error, BudgetExceeded) and "analyze answered 429 BudgetExhausted" in str(error)


def test_the_services_own_500_is_not_retried_and_a_proxys_502_is_for_an_idempotent_call():
    broken = Answer(500, error_body("InternalError", None, "internal error; it is logged"))
    with HttpStub(broken) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        with pytest.raises(ServiceError) as raised:
            client.analyze(IMAGE)
    assert len(stub.seen) == 1 and raised.value.status == 500 and raised.value.error == "InternalError"
    assert not raised.value.proxy_answer  # a bug of the service's: sending it again would repeat it

    gateway = Answer(502, "<html>Bad Gateway</html>")
    with HttpStub(gateway, Answer()) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        assert client.analyze(IMAGE).decision == "accept"
    assert len(set(stub.request_ids())) == 1 and len(stub.seen) == 2

    with HttpStub(gateway, Answer(body={"id": 7})) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        with pytest.raises(ServiceError) as raised:  # the write may have happened behind the gateway
            client.index_item(IMAGE)
    assert len(stub.seen) == 1 and raised.value.status == 502 and raised.value.proxy_answer


def test_ray_serves_plain_500_at_a_replica_death_is_resent_only_when_that_is_safe():
    died = Answer(500, "Internal Server Error")  # Ray Serve's answer when the replica died under it
    with HttpStub(died, Answer()) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        result = client.analyze(IMAGE, request_id="upload-7")  # the ledger and queue key on the id
    assert stub.request_ids() == ["upload-7", "upload-7"] and result.request_id == "upload-7"

    with (
        HttpStub(died, Answer(body={"task": "classify", "labels": None})) as stub,
        VisionRouteClient(stub.url, retry=FAST) as client,
    ):
        assert client.review_labels("classify").task == "classify"  # a read: resent
    assert len(stub.seen) == 2

    unsafe = [
        lambda client: client.index_item(IMAGE),
        lambda client: client.claim("ann"),  # the next item: a second send could lease another
        lambda client: client.release("item-1", lease_token="t"),
    ]
    for send in unsafe:
        with (
            HttpStub(died, Answer(body={"id": 7})) as stub,
            VisionRouteClient(stub.url, retry=FAST) as client,
        ):
            with pytest.raises(ServiceError) as raised:
                send(client)
        assert len(stub.seen) == 1 and raised.value.status == 500 and raised.value.proxy_answer
        assert raised.value.reason == "Internal Server Error"


def test_attempts_run_out_and_the_last_refusal_is_raised():
    again = Answer(503, error_body("BackendUnavailable", "service", "try again"), {"Retry-After": "0"})
    with HttpStub(again, again, again, Answer()) as stub:
        with VisionRouteClient(stub.url, retry=RetryPolicy(attempts=3, backoff_s=0.01)) as client:
            with pytest.raises(ServiceError) as raised:
                client.analyze(IMAGE)
    assert len(stub.seen) == 3 and len(set(stub.request_ids())) == 1
    assert raised.value.status == 503 and raised.value.retry_after_s == 0


def test_a_timed_out_analyse_is_retried_with_its_id_but_an_index_write_is_not():
    late = Answer(delay_s=1.5)
    with HttpStub(late, Answer()) as stub, VisionRouteClient(stub.url, timeout_s=0.3, retry=FAST) as client:
        result = client.analyze(IMAGE)
    first, second = stub.request_ids()
    assert first == second == result.request_id  # the service keys its review item on it: no second item

    with (
        HttpStub(late, Answer(body={"id": 7})) as stub,
        VisionRouteClient(stub.url, timeout_s=0.3, retry=FAST) as client,
    ):
        with pytest.raises(ServiceUnreachable) as raised:
            client.index_item(IMAGE, {"tenant": "acme"})
    assert len(stub.seen) == 1 and raised.value.sent and raised.value.field == "timeout_s"
    assert "0.3 s" in raised.value.reason


def test_nothing_listening_is_retried_then_named():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    client = VisionRouteClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(attempts=2, backoff_s=0.01))
    with client, pytest.raises(ServiceUnreachable) as raised:
        client.review_stats()
    assert raised.value.field == "url" and not raised.value.sent and str(port) in raised.value.reason


def test_refusals_are_the_projects_error_kinds_and_the_cli_client_adds_a_key_hint():
    missing = Answer(404, error_body("NotFound", "item_id", "no review item 'x'"))
    with HttpStub(missing) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        with pytest.raises(NotFound) as raised:
            client.review_item("x")
    assert raised.value.field == "item_id" and stub.seen[0].path == "/v1/review/items/x"

    denied = Answer(401, error_body("Unauthenticated", "x-api-key", "no API key"))
    with HttpStub(denied) as stub, pytest.raises(ServiceError) as raised:
        ServiceClient(stub.url, None).call("GET", "/v1/rollouts")
    reason = raised.value.reason  # what the command line prints after "error (x-api-key): "
    assert (
        reason.startswith(f"{stub.url}: GET /v1/rollouts answered 401 Unauthenticated")
        and "no API key" in reason
    )
    assert reason.endswith(KEY_HINT) and raised.value.field == "x-api-key" and raised.value.status == 401


def test_the_commands_that_call_the_service_go_through_the_client(capsys):
    answers = [
        Answer(body={"rollouts": []}),  # rollout status
        Answer(body={"replica": "r1", "monitors": []}),  # drift report
        Answer(body={"status": "ok"}),  # retrieval stats: does the service answer?
        Answer(body={"tenant": None, "items": 3, "kind": "flat"}),  # ... its index's stats
    ]
    with HttpStub(*answers) as stub:
        for argv in (["rollout", "status"], ["drift", "report", "--json"], ["retrieval", "stats"]):
            assert main([*argv, "--url", stub.url, "--api-key", "vr_key"]) == 0, argv
    assert [s.path for s in stub.seen] == ["/v1/rollouts", "/v1/drift", "/healthz", "/v1/search/stats"]
    through_client = [s for s in stub.seen if s.path != "/healthz"]  # the probe is a bare GET
    assert all(s.user_agent.startswith("visionroute-client/") for s in through_client)
    assert all(s.api_key == "vr_key" and s.request_id for s in through_client)
    assert '"items": 3' in capsys.readouterr().out


def test_bad_arguments_name_the_field():
    cases = [
        (lambda: VisionRouteClient("ftp://host"), ConfigError, "url"),
        (lambda: VisionRouteClient("http://127.0.0.1:1", timeout_s=0), ConfigError, "timeout_s"),
        (lambda: RetryPolicy(attempts=0), ConfigError, "attempts"),
        (lambda: VisionRouteClient().analyze(IMAGE, request_id="not an id!"), InputError, "request_id"),
        (lambda: VisionRouteClient().analyze(), InputError, "image"),
        (lambda: VisionRouteClient().search(), InputError, "query"),
    ]
    for make, kind, name in cases:
        with pytest.raises(kind) as raised:
            make()
        assert raised.value.field == name, raised.value


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_s("2") == 2.0 and retry_after_s("0") == 0.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert 5 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 11


# -- gRPC -----------------------------------------------------------------------------------------


class GrpcStub:
    """A loopback gRPC server with the project's stubs: Analyze refuses ``refusals`` times
    (by default RESOURCE_EXHAUSTED, the service's JSON details, a ``retry-after`` trailer), then
    answers."""

    def __init__(
        self,
        refusals: int,
        retry_after: str | None,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
        details: str = json.dumps(error_body("BudgetExhausted", "budget:ten", "spent")),
    ) -> None:
        pb, stubs = generated()
        self.seen: list[tuple[float, dict]] = []
        stub = self

        class Servicer(stubs.VisionRouteServicer):
            def Analyze(self, request, context):
                metadata = dict(context.invocation_metadata())
                stub.seen.append((time.monotonic(), metadata))
                if len(stub.seen) <= refusals:
                    if retry_after is not None:
                        context.set_trailing_metadata([("retry-after", retry_after)])
                    context.abort(code, details)
                return pb.AnalyzeResponse(
                    request_id=metadata["request_id"],
                    task="classify",
                    decision="accept",
                    answer=[pb.Detection(label="espresso", class_id=967, confidence=0.9, xyxy=[0, 0, 8, 8])],
                    image=pb.ImageInfo(sha256="0" * 64, width=8, height=8),
                    trace=pb.Trace(request_id=metadata["request_id"], decision="accept"),
                    policy_version="policies-v1",
                )

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        stubs.add_VisionRouteServicer_to_server(Servicer(), self.server)
        self.url = f"grpc://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> GrpcStub:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)


def test_grpc_retries_honour_the_retry_after_trailer_and_send_one_request_id():
    with GrpcStub(refusals=1, retry_after="1") as stub:
        with VisionRouteClient(stub.url, "vr_key", retry=FAST, application="visionroute") as client:
            result = client.analyze(IMAGE)
    (first_at, first), (second_at, second) = stub.seen
    assert first["request_id"] == second["request_id"] == result.request_id
    assert first["x-api-key"] == "vr_key" and first["application"] == "visionroute"
    assert second_at - first_at >= 0.95 and result.answer[0].label == "espresso"

    async def scenario(url: str):
        async with AsyncVisionRouteClient(url, retry=FAST) as client:
            return await client.analyze(IMAGE, request_id="async-1")

    with GrpcStub(refusals=2, retry_after="0") as stub:
        assert asyncio.run(scenario(stub.url)).request_id == "async-1"
    assert [m["request_id"] for _, m in stub.seen] == ["async-1"] * 3

    with GrpcStub(refusals=1, retry_after="3600") as stub, VisionRouteClient(stub.url, retry=FAST) as client:
        with pytest.raises(BudgetExceeded) as raised:
            client.analyze(IMAGE)
    error = raised.value
    assert len(stub.seen) == 1 and error.grpc_code == "RESOURCE_EXHAUSTED" and error.status == 429
    assert error.field == "budget:ten" and error.retry_after_s == 3600


def test_grpc_resends_an_analyse_whose_replica_died_under_it():
    died = (
        "The actor died unexpectedly before finishing this task. class_name: ServeReplica:visionroute:Ingress"
    )
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        with GrpcStub(1, None, code, died) as stub, VisionRouteClient(stub.url, retry=FAST) as client:
            result = client.analyze(IMAGE, request_id="grpc-died-1")
        assert [m["request_id"] for _, m in stub.seen] == [
            "grpc-died-1"
        ] * 2 and result.request_id == "grpc-died-1"

    own = json.dumps(error_body("InternalError", None, "internal error; it is logged"))
    with (
        GrpcStub(1, None, grpc.StatusCode.INTERNAL, own) as stub,
        VisionRouteClient(stub.url, retry=FAST) as client,
    ):
        with pytest.raises(ServiceError) as raised:
            client.analyze(IMAGE)
    assert len(stub.seen) == 1 and raised.value.status == 500 and not raised.value.proxy_answer
