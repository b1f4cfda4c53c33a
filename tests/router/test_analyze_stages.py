"""The analyse path's stages (router/services/analyze/), each on its own: its job and its trace
step; their declared order; the shadow run off the response's path; budgets and degrade modes
in the one budget guard. Small synthetic images and fakes where meaning is not needed, the real
colour model (tests/router/colour_model.py) through the service where it is."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from cascades.decode_budget import DecodeBudget
from cascades.image_redaction import StoredImage
from cascades.images import DecodedImage
from cascades.pipeline import CheapTierStage, DecideStage, ShiftGuardStage, TierResult, VlmStage
from policies.budgets import BudgetLedger
from policies.policy_set import PolicySet
from policies.runtime import PolicyRuntime
from policies.thresholds import ThresholdPolicy
from router.services import ImageRequest, VisionRouteService
from router.services.analyze import RequestContext
from router.services.analyze.after_response import AfterResponseMetrics, IndexQueue
from router.services.analyze.budget import BudgetGuard
from router.services.analyze.context import QueueTicket
from router.services.analyze.pipeline import Pipeline
from router.services.analyze.stages import (
    ArmStage,
    DecodeStage,
    DriftEmbeddingStage,
    DriftStage,
    FilePixelsStage,
    MetricsStage,
    PrivacyStage,
    QueueSelectStage,
    SearchIndexStage,
    StoreStage,
)
from router.services.backends import LocalOnnxTier
from router.services.rollouts import Arm
from tests.router.colour_model import LABELS, colour_app_config, solid_png
from tests.router.test_rollouts import ADMIN, rollout_config
from visionroute.errors import BackendUnavailable, BudgetExceeded, InputError
from visionroute.records import Analysis, Decision, Detections, Step, Trace

THRESHOLDS = ThresholdPolicy(version="colour-v1", accept_threshold=0.9, escalate_threshold=0.2)


def run(coroutine):
    return asyncio.run(coroutine)


# -- small fakes -------------------------------------------------------------------------------


class FixedTier:
    """A cheap tier answering one class distribution (or failing), counting its calls."""

    def __init__(self, probabilities=(0.95, 0.03, 0.02), *, fails: bool = False, cost_units: float = 1.0):
        self.probabilities = np.asarray(probabilities, np.float32)
        self.fails, self.cost_units, self.calls = fails, cost_units, 0

    async def predict(self, image_rgb: np.ndarray) -> TierResult:
        self.calls += 1
        if self.fails:
            raise ConnectionError("replica gone")
        height, width = image_rgb.shape[:2]
        detections = Detections.from_class_probabilities(
            self.probabilities, LABELS, width=width, height=height
        )
        return TierResult(detections, "colour", "colour-sha", 2.0, self.cost_units)


class Recorder:
    """A prometheus-like counter family: ``labels(...).inc()`` counts per label tuple."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def labels(self, *labels):
        return SimpleNamespace(inc=lambda: self.counts.update([labels]))


class FakeMetrics:
    def __init__(self) -> None:
        self.budget_refusals, self.decisions, self.traces = Recorder(), Recorder(), []

    def observe_trace(self, task, trace) -> None:
        self.traces.append((task, [step.stage for step in trace]))


def runtime(tmp_path, **policy) -> PolicyRuntime:
    return PolicyRuntime(
        PolicySet(**policy),
        BudgetLedger(tmp_path / "budgets.sqlite3"),
        tasks=["colour"],
        base_thresholds={"colour": THRESHOLDS},
    )


def context(
    policies: PolicyRuntime | None = None, *, tier=None, vlm=None, image_size: int = 32
) -> RequestContext:
    """A context as the stages before the cascade leave it: request, tenant, task, decoded
    image, a fresh ``Analysis`` and the incumbent arm."""
    policy = policies.current if policies is not None else PolicySet()
    ctx = RequestContext(ImageRequest(b"png-bytes", "r1"), None)
    ctx.tenant, ctx.task = "default", "colour"
    rgb = np.full((image_size, image_size, 3), 200, np.uint8)
    ctx.decoded = DecodedImage(rgb, "0" * 64, "PNG")
    ctx.analysis = Analysis(rgb, "0" * 64, "colour", trace=Trace("r1"), policy_version=policy.version)
    ctx.arm = Arm(policy, tier or FixedTier(), THRESHOLDS, 1.0)
    ctx.vlm = vlm
    return ctx


def stages_of(ctx: RequestContext) -> list[str]:
    return [step.stage for step in ctx.analysis.trace]


class Ran:
    """A stage that only records that it ran."""

    name = "ran"

    def __init__(self) -> None:
        self.count = 0

    async def run(self, ctx) -> None:
        self.count += 1


# -- the declared order ------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path) -> VisionRouteService:
    config = colour_app_config(tmp_path)
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    return VisionRouteService.build(config, tiers={"colour": tier})


def test_the_stages_are_declared_in_one_order(service):
    pipeline = service.analyze.pipeline
    assert pipeline.names() == (
        "input",
        "arm",
        "budget:onnx",
        "cheap_tier",
        "decide",
        "shift_guard",
        "budget:vlm",
        "vlm",
        "file_pixels",
        "review_select",
        "budget:review",
        "privacy",
        "store",
        "search_index",
        "metrics",
        "drift",
    )
    assert [stage.name for stage in pipeline.after_response] == ["rollout_evidence", "drift_embedding"]


def test_a_request_leaves_one_step_per_deciding_stage_in_the_declared_order(service):
    grey = run(service.analyze.analyze(ImageRequest(solid_png((128, 128, 128)), "g1"), None))
    assert [s.stage for s in grey.trace] == [
        "input",
        "onnx:colour",
        "policy:thresholds",
        "privacy:redact",
        "review_queue",
    ]
    red = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r1"), None))
    assert [s.stage for s in red.trace] == ["input", "onnx:colour", "policy:thresholds"]
    assert red.decision is Decision.ACCEPT and red.policy_version == "policies-v1"


def test_a_new_capability_is_one_more_stage_object(service):
    class RouterScore:  # e.g. a learned router's score, recorded as its own step
        name = "router_score"

        async def run(self, ctx) -> None:
            ctx.analysis.trace.append(Step(stage="router:score", score=0.5))

    pipeline = service.analyze.pipeline
    service.analyze.pipeline = dataclasses.replace(pipeline, stages=(*pipeline.stages, RouterScore()))
    analysis = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r1"), None))
    assert [s.stage for s in analysis.trace][-1] == "router:score"
    assert service.analyze.pipeline.names()[-1] == "router_score"


# -- input and arm -----------------------------------------------------------------------------


def test_decode_checks_the_task_first_then_decodes_and_starts_the_trace(tmp_path):
    config = colour_app_config(tmp_path)
    stage = DecodeStage(config, {"colour"}, {})
    unknown = RequestContext(ImageRequest(b"not even an image", "r1", task="nope"), None)
    with pytest.raises(InputError) as error:
        run(stage.run(unknown))  # before any decode: the context has no decode session at all
    assert error.value.field == "task" and "['colour']" in error.value.reason

    async def decode() -> RequestContext:
        async with DecodeBudget(config.limits.decode).session() as session:
            ctx = RequestContext(ImageRequest(solid_png((1, 2, 3), 40), "r2", tenant="acme"), None, session)
            await stage.run(ctx)
            return ctx

    ctx = run(decode())
    assert (ctx.tenant, ctx.task, ctx.analysis.tenant) == ("acme", "colour", "acme")
    (step,) = ctx.analysis.trace
    assert step.stage == "input" and step.details["format"] == "PNG"
    assert (step.details["width"], step.details["height"]) == (40, 40) and "decoded_width" not in step.details
    assert ctx.analysis.trace.request_id == "r2" and ctx.analysis.image_rgb.shape == (40, 40, 3)


def test_a_jpeg_twice_the_models_input_decodes_at_its_size_unless_the_tenant_redacts(tmp_path):
    """``limits.decode.jpeg_at_model_size``: DCT scaling, never below the model's input; a tenant
    whose privacy rule redacts keeps the whole image (its review item's redaction needs it), and
    so does a task with a learned router or a rollout."""
    import io

    from PIL import Image

    from cascades.decode_budget import InputNeed

    config = colour_app_config(tmp_path)
    assert config.limits.decode.jpeg_at_model_size  # the default
    policies = runtime(
        tmp_path, privacy={"faces": "keep", "text": "keep", "tenants": {"acme": {"faces": "blur"}}}
    )
    stage = DecodeStage(config, {"colour"}, {"colour": InputNeed(side=32)}, policies)
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (200, 30, 30)).save(buffer, format="JPEG", quality=90)

    async def decode(tenant: str, stage: DecodeStage = stage) -> RequestContext:
        async with DecodeBudget(config.limits.decode).session() as session:
            ctx = RequestContext(ImageRequest(buffer.getvalue(), "r", tenant=tenant), None, session)
            await stage.run(ctx)
            return ctx

    reduced, whole = run(decode("default")), run(decode("acme"))
    assert reduced.analysis.image_rgb.shape == (50, 100, 3)  # 1/2: 1/4 would be below 32 px
    details = reduced.analysis.trace.steps[0].details
    assert (details["width"], details["height"], details["decoded_width"]) == (200, 100, 100)
    assert whole.analysis.image_rgb.shape == (100, 200, 3) and not whole.decoded.is_reduced
    # a learned router's features (or a drift input reference) came from whole decodes: kept whole
    routed = DecodeStage(config, {"colour"}, {"colour": InputNeed(side=32)}, policies, {"colour"})
    assert not run(decode("default", routed)).decoded.is_reduced
    # a rollout in effect (or an adopted artefact) may serve another model: kept whole too
    rolling = SimpleNamespace(may_change_arm=lambda task: task == "colour")
    in_rollout = DecodeStage(config, {"colour"}, {"colour": InputNeed(side=32)}, policies, rollouts=rolling)
    assert not run(decode("default", in_rollout)).decoded.is_reduced


def test_the_arm_is_the_incumbent_outside_a_rollout(tmp_path):
    config = colour_app_config(tmp_path)
    policies = runtime(tmp_path, version="p-7")
    tier = FixedTier()
    ctx = context()
    run(ArmStage(config, policies, {"colour": tier}, {}, None).run(ctx))
    assert ctx.arm.policy.version == "p-7" and ctx.analysis.policy_version == "p-7"
    assert ctx.arm.cheap_tier is tier and ctx.arm.choice is None and ctx.vlm is None
    assert ctx.arm.cost_units == config.cascades["colour"].tier.cost_units
    assert stages_of(ctx) == []  # no rollout, no step


def test_a_rollout_arm_is_chosen_once_and_named_in_the_trace(tmp_path):
    config = colour_app_config(tmp_path)
    policies = runtime(tmp_path)
    candidate = FixedTier()

    class OneRollout:
        def __init__(self):
            self.asked = []

        async def arm(self, task, incumbent, request_id, tenant):
            self.asked.append((task, request_id, tenant))
            arm = dataclasses.replace(
                incumbent, policy=PolicySet(version="candidate-v2"), cheap_tier=candidate
            )
            return SimpleNamespace(
                **vars(arm), step=lambda: Step(stage="rollout", details={"arm": "candidate"})
            )

    rollouts = OneRollout()
    ctx = context()
    run(ArmStage(config, policies, {"colour": FixedTier()}, {}, rollouts).run(ctx))
    assert rollouts.asked == [("colour", "r1", "default")]
    assert ctx.arm.cheap_tier is candidate and ctx.analysis.policy_version == "candidate-v2"
    assert stages_of(ctx) == ["rollout"]


# -- the cascade's stages over the request context -----------------------------------------------


def test_the_cheap_tier_records_its_answer_score_and_cost():
    ctx = context(tier=FixedTier((0.95, 0.03, 0.02), cost_units=0.5))
    run(CheapTierStage().run(ctx))
    (step,) = ctx.analysis.trace
    assert step.stage == "onnx:colour" and step.model_version == "colour-sha"
    assert step.score == pytest.approx(0.95) and step.cost_units == 0.5 and step.decision is None
    assert step.details["label"] == "red" and len(step.details["confidences"]) == 3
    assert ctx.analysis.detections is not None and not ctx.cheap_tier_failed


def test_a_failing_cheap_tier_is_a_review_step_and_nothing_after_it_judges():
    ctx = context(tier=FixedTier(fails=True))
    for stage in (CheapTierStage(), DecideStage()):
        run(stage.run(ctx))
    assert ctx.cheap_tier_failed and stages_of(ctx) == ["onnx:colour"]
    (step,) = ctx.analysis.trace
    assert step.decision is Decision.REVIEW and "ConnectionError" in step.error


@pytest.mark.parametrize(
    ("top", "vlm", "decision"),
    [(0.95, None, Decision.ACCEPT), (0.5, "a vlm", Decision.ESCALATE), (0.5, None, Decision.REVIEW)],
)
def test_decide_applies_the_thresholds(top, vlm, decision):
    ctx = context(tier=FixedTier((top, (1 - top) / 2, (1 - top) / 2)), vlm=vlm)
    run(CheapTierStage().run(ctx))
    run(DecideStage().run(ctx))
    step = ctx.analysis.trace.steps[-1]
    assert step.stage == "policy:thresholds" and step.decision is decision
    assert step.details["vlm_available"] is (vlm is not None)


class FakeShiftGuard:
    def __init__(self) -> None:
        self.checked = 0

    def check(self, image):
        self.checked += 1
        return "shifted"

    def step(self, verdict, decision, *, vlm_available):
        return Step(stage="policy:shift_guard", decision=Decision.REVIEW, reason=verdict)


@pytest.mark.parametrize(("top", "guarded_step"), [(0.95, True), (0.5, False)])
def test_the_shift_guard_checks_every_input_and_judges_only_an_accept(top, guarded_step):
    guard = FakeShiftGuard()
    ctx = context(tier=FixedTier((top, (1 - top) / 2, (1 - top) / 2)))
    run(CheapTierStage().run(ctx))
    run(DecideStage().run(ctx))
    state = SimpleNamespace(analysis=ctx.analysis, shift_guard=guard, vlm=None, cheap_tier_failed=False)
    run(ShiftGuardStage().run(state))
    assert guard.checked == 1
    assert (stages_of(ctx)[-1] == "policy:shift_guard") is guarded_step
    if guarded_step:
        assert ctx.analysis.decision is Decision.REVIEW


def test_the_vlm_answers_only_an_escalation_and_a_host_failure_is_a_review_step():
    asked = []

    async def vlm(analysis):
        asked.append(analysis.trace.request_id)
        analysis.trace.append(Step(stage="vlm", decision=Decision.ACCEPT, cost_units=3.0))
        return analysis

    sure = context(tier=FixedTier((0.95, 0.03, 0.02)), vlm=vlm)
    unsure = context(tier=FixedTier((0.5, 0.25, 0.25)), vlm=vlm)
    for ctx in (sure, unsure):
        for stage in (CheapTierStage(), DecideStage(), VlmStage()):
            run(stage.run(ctx))
    assert asked == ["r1"] and stages_of(unsure)[-1] == "vlm" and unsure.analysis.decision is Decision.ACCEPT
    assert stages_of(sure)[-1] == "policy:thresholds"

    async def down(analysis):
        raise TimeoutError("no answer")

    failing = context(tier=FixedTier((0.5, 0.25, 0.25)), vlm=down)
    for stage in (CheapTierStage(), DecideStage(), VlmStage()):
        run(stage.run(failing))
    step = failing.analysis.trace.steps[-1]
    assert step.stage == "vlm" and step.decision is Decision.REVIEW and "TimeoutError" in step.error


# -- after the cascade ---------------------------------------------------------------------------


def test_file_pixels_maps_a_reduced_decode_back_to_the_files_size():
    ctx = context(image_size=32)
    run(CheapTierStage().run(ctx))
    run(FilePixelsStage().run(ctx))
    assert "image_size" not in ctx.analysis.metadata  # decoded whole: nothing to map
    ctx.decoded = dataclasses.replace(ctx.decoded, original_size=(64, 128))
    run(FilePixelsStage().run(ctx))
    assert ctx.analysis.metadata["image_size"] == (64, 128)
    assert ctx.analysis.detections.xyxy[0].tolist() == [0.0, 0.0, 64.0, 128.0]
    assert stages_of(ctx) == ["onnx:colour"]  # no step of its own


@pytest.mark.parametrize(
    ("decision", "budget_step", "audit_fraction", "arm_reason", "ticket"),
    [
        (Decision.REVIEW, False, 0.0, None, QueueTicket("review")),
        (Decision.ESCALATE, True, 0.0, None, QueueTicket("budget")),
        (Decision.ACCEPT, False, 1.0, "rollout sample", QueueTicket("audit", None, "policy", 1.0)),
        (
            Decision.ACCEPT,
            False,
            0.0,
            "rollout sample",
            QueueTicket("audit", "rollout sample", "rollout", 0.2),
        ),
        (Decision.ACCEPT, False, 0.0, None, None),
    ],
)
def test_review_select_picks_what_goes_to_the_queue(
    tmp_path, decision, budget_step, audit_fraction, arm_reason, ticket
):
    policies = runtime(tmp_path, audit={"fraction": audit_fraction})
    ctx = context(policies)
    rollout = SimpleNamespace(status="running", audit_fraction=0.2)  # its audits: 20% of the arm's accepts
    ctx.arm = SimpleNamespace(
        policy=policies.current,
        audit_sample_reason=lambda analysis: arm_reason,
        choice=SimpleNamespace(rollout=rollout),
    )
    if budget_step:
        ctx.analysis.trace.append(Step(stage="policy:budget", decision=Decision.REVIEW))
    ctx.analysis.trace.append(Step(stage="policy:thresholds", decision=decision))
    run(QueueSelectStage(policies).run(ctx))
    assert ctx.ticket == ticket


class FakeRedactor:
    def __init__(self, withheld: str | None = None) -> None:
        self.withheld, self.calls = withheld, []

    def prepare(self, image_bytes, rgb, policy, tenant, *, policy_version=None):
        self.calls.append((image_bytes, tenant, policy_version))
        step = Step(stage="privacy:redact", reason="redacted", policy_version=policy_version)
        data = None if self.withheld else b"redacted"
        return StoredImage(data, None, self.withheld, step)


def test_privacy_redacts_only_what_will_be_stored():
    redactor = FakeRedactor()
    ctx = context()
    run(PrivacyStage(redactor).run(ctx))
    assert redactor.calls == [] and ctx.stored is None and stages_of(ctx) == []
    ctx.ticket = QueueTicket("review")
    run(PrivacyStage(redactor).run(ctx))
    assert redactor.calls == [(b"png-bytes", "default", "policies-v1")]
    assert ctx.stored.data == b"redacted" and stages_of(ctx) == ["privacy:redact"]


class FakeQueue:
    def __init__(self, fails: Exception | None = None) -> None:
        self.fails, self.items = fails, []

    def enqueue(self, **item):
        if self.fails is not None:
            raise self.fails
        self.items.append(item)
        return SimpleNamespace(id=f"item-{len(self.items)}", priority=1.5)


def stored_context(kind: str, reason: str | None = None, withheld: str | None = None) -> RequestContext:
    ctx = context()
    run(CheapTierStage().run(ctx))
    ctx.analysis.trace.append(Step(stage="policy:thresholds", decision=Decision.REVIEW, reason="unsure"))
    ctx.ticket = QueueTicket(kind, reason)
    ctx.stored = FakeRedactor(withheld).prepare(b"png-bytes", None, None, "default")
    return ctx


def test_store_queues_a_review_that_decides_and_an_audit_that_does_not():
    queue = FakeQueue()
    store = StoreStage(queue)
    review = stored_context("review", withheld="face detector failed")
    run(store.run(review))
    step = review.analysis.trace.steps[-1]
    assert step.stage == "review_queue" and step.decision is Decision.REVIEW
    assert review.analysis.review_item_id == "item-1" and step.cost_units == PolicySet().costs.review_units
    assert queue.items[0]["reason"] == "unsure; image not stored: face detector failed"
    assert queue.items[0]["label_set"] == tuple(LABELS) and queue.items[0]["kind"] == "review"
    audit = stored_context("audit")
    run(store.run(audit))
    step = audit.analysis.trace.steps[-1]
    assert step.stage == "review_queue:audit" and step.decision is None
    assert audit.analysis.review_item_id is None and audit.analysis.decision is Decision.REVIEW
    assert queue.items[1]["label_set"] is None  # the task's label set is stored once
    assert queue.items[1]["reason"].startswith("audit sample (")


def test_a_queue_that_cannot_store_fails_the_request():
    with pytest.raises(BackendUnavailable, match="disk full"):
        run(StoreStage(FakeQueue(OSError("disk full"))).run(stored_context("review")))


class FakeSearch:
    def __init__(self, fails: bool = False) -> None:
        self.fails, self.calls = fails, []

    async def call(self, method, *args):
        self.calls.append(method)
        if self.fails:
            raise ConnectionError("search replica gone")
        return {"ids": [7] * len(args[0])} if method == "index_analysed" else 7


def test_search_index_records_the_id_or_the_failure_and_never_decides(tmp_path):
    config = colour_app_config(tmp_path)
    config = config.model_copy(
        update={"retrieval": config.retrieval.model_copy(update={"index_analysed": True})}
    )
    ok, failed = context(), context()
    metrics = AfterResponseMetrics(None)
    run(SearchIndexStage(IndexQueue(FakeSearch(), config.retrieval, metrics)).run(ok))
    run(SearchIndexStage(IndexQueue(FakeSearch(fails=True), config.retrieval, metrics)).run(failed))
    (step,) = ok.analysis.trace
    durable = {"mode": "durable", "status": "indexed"}  # retrieval.index_queue.mode's default
    assert step.stage == "retrieval:index" and ok.search_id == 7
    assert step.details == {"search_id": 7, "search_index": durable}
    (step,) = failed.analysis.trace
    assert step.stage == "retrieval:index" and "ConnectionError" in step.error and step.decision is None
    off = context()
    run(SearchIndexStage(IndexQueue(None, config.retrieval, metrics)).run(off))
    assert stages_of(off) == [] and off.search_id is None


def test_metrics_count_the_decision_under_its_policy_version_and_every_step():
    metrics = FakeMetrics()
    ctx = context(tier=FixedTier())
    for stage in (CheapTierStage(), DecideStage(), MetricsStage(metrics)):
        run(stage.run(ctx))
    assert metrics.decisions.counts == Counter({("colour", "accept", "policies-v1"): 1})
    assert metrics.traces == [("colour", ["onnx:colour", "policy:thresholds"])]


def test_drift_observes_the_request_and_leaves_out_a_candidates_score():
    seen = []
    drift = SimpleNamespace(observe_request=lambda a, b, count_score: seen.append((b, count_score)))
    ctx = context()
    run(DriftStage(drift).run(ctx))
    ctx.arm = SimpleNamespace(counts_for_drift=False)
    run(DriftStage(drift).run(ctx))
    run(DriftStage(None).run(ctx))
    assert seen == [(b"png-bytes", True), (b"png-bytes", False)]


def test_drift_embeddings_are_read_after_the_response_for_indexed_images_only(tmp_path):
    config = colour_app_config(tmp_path)
    config = config.model_copy(update={"drift": config.drift.model_copy(update={"embedding_fraction": 1.0})})
    vectors = []
    drift = SimpleNamespace(observe_embedding=lambda task, vector: vectors.append((task, vector)))

    class Search:
        async def call(self, method, *args):
            return {"vector": [1.0, 0.0]}

    stage = DriftEmbeddingStage(config, drift, Search())
    ctx = context()
    assert not stage.wants(ctx)  # not indexed
    ctx.search_id = 3
    assert stage.wants(ctx) and not DriftEmbeddingStage(config, None, Search()).wants(ctx)
    run(stage.run(ctx))
    assert vectors == [("colour", [1.0, 0.0])]


# -- budgets and degrade modes: the one budget guard ------------------------------------------------


def budget_rule(tiers, degrade, cap_units=0.0):
    return {"name": "tight", "tiers": tiers, "window_s": 3600, "cap_units": cap_units, "degrade": degrade}


def test_a_cheap_tier_refused_in_review_mode_skips_the_cascade_and_goes_to_review(tmp_path):
    policies = runtime(tmp_path, budgets=[budget_rule(["onnx"], "review")])
    metrics, inner = FakeMetrics(), Ran()
    guard = BudgetGuard(policies, metrics)
    ctx = context(policies)
    run(guard.paid("onnx", inner).run(ctx))
    assert inner.count == 0
    (step,) = ctx.analysis.trace
    assert step.stage == "policy:budget" and step.decision is Decision.REVIEW
    assert step.details["budget"] == "tight" and step.details["degrade"] == "review"
    assert ctx.analysis.degraded and metrics.budget_refusals.counts == Counter({("tight", "review"): 1})
    run(QueueSelectStage(policies).run(ctx))
    assert ctx.ticket == QueueTicket("budget")


@pytest.mark.parametrize("degrade", ["reject", "accept_degraded"])
def test_a_cheap_tier_refused_with_no_answer_to_give_is_a_429(tmp_path, degrade):
    policies = runtime(tmp_path, budgets=[budget_rule(["onnx"], degrade)])
    inner = Ran()
    with pytest.raises(BudgetExceeded) as error:
        run(BudgetGuard(policies, FakeMetrics()).paid("onnx", inner).run(context(policies)))
    assert inner.count == 0 and error.value.retry_after_s > 0
    assert ("no cheap answer to give yet" in error.value.reason) is (degrade == "accept_degraded")


def test_the_cheap_tier_is_settled_at_its_real_cost(tmp_path):
    policies = runtime(tmp_path, budgets=[budget_rule(["onnx"], "reject", cap_units=5.0)])
    ctx = context(policies, tier=FixedTier(cost_units=0.25))
    run(BudgetGuard(policies, FakeMetrics()).paid("onnx", CheapTierStage(), DecideStage()).run(ctx))
    assert stages_of(ctx) == ["onnx:colour", "policy:thresholds"]
    (usage,) = policies.ledger.usage()
    assert (usage["tier"], usage["units"], usage["calls"]) == ("onnx", 0.25, 1)
    (status,) = policies.ledger.status(policies.current.budgets)
    assert status["used_units"] == 0.25


def vlm_context(policies, vlm):
    ctx = context(policies, tier=FixedTier((0.5, 0.25, 0.25)), vlm=vlm)
    for stage in (CheapTierStage(), DecideStage()):
        run(stage.run(ctx))
    return ctx


def test_a_refused_vlm_call_in_accept_degraded_keeps_the_cheap_answer_flagged(tmp_path):
    policies = runtime(tmp_path, budgets=[budget_rule(["vlm"], "accept_degraded")])
    called = []

    async def vlm(analysis):
        called.append(1)
        return analysis

    ctx = vlm_context(policies, vlm)
    run(BudgetGuard(policies, FakeMetrics()).paid_calls("vlm", VlmStage()).run(ctx))
    assert called == []
    step = ctx.analysis.trace.steps[-1]
    assert step.stage == "policy:budget" and step.decision is Decision.ACCEPT and ctx.analysis.degraded


def test_a_vlm_call_that_raised_is_charged_its_whole_reservation(tmp_path):
    policies = runtime(tmp_path)

    async def down(analysis):
        raise TimeoutError("no answer")

    ctx = vlm_context(policies, down)
    run(BudgetGuard(policies, FakeMetrics()).paid_calls("vlm", VlmStage()).run(ctx))
    assert ctx.analysis.trace.steps[-1].stage == "vlm" and ctx.analysis.decision is Decision.REVIEW
    (usage,) = policies.ledger.usage()
    assert (usage["tier"], usage["units"]) == ("vlm", policies.current.costs.vlm_reserve_units)


def test_a_refused_review_stores_nothing_and_an_audit_is_never_refused(tmp_path):
    policies = runtime(tmp_path, budgets=[budget_rule(["review"], "accept_degraded")])
    guard, redact, store = BudgetGuard(policies, FakeMetrics()), Ran(), Ran()
    review = stored_context("review")
    review.arm = dataclasses.replace(review.arm, policy=policies.current)
    run(guard.paid("review", redact, store).run(review))
    assert (redact.count, store.count) == (0, 0)
    assert review.analysis.trace.steps[-1].stage == "policy:budget"
    audit = stored_context("audit")
    audit.arm = dataclasses.replace(audit.arm, policy=policies.current)
    run(guard.paid("review", redact, store).run(audit))
    assert (redact.count, store.count) == (1, 1)
    (usage,) = policies.ledger.usage()
    assert (usage["tier"], usage["units"]) == ("review", policies.current.costs.review_units)


def test_a_failed_queue_write_gives_the_review_units_back(tmp_path):
    policies = runtime(tmp_path, budgets=[budget_rule(["review"], "reject", cap_units=10.0)])
    ctx = stored_context("review")
    ctx.arm = dataclasses.replace(ctx.arm, policy=policies.current)
    write = BudgetGuard(policies, FakeMetrics()).paid("review", StoreStage(FakeQueue(OSError("disk full"))))
    with pytest.raises(BackendUnavailable):
        run(write.run(ctx))
    (status,) = policies.ledger.status(policies.current.budgets)
    assert status["used_units"] == 0.0


def test_through_the_service_an_exhausted_budget_in_review_mode_queues_the_request_unanswered(tmp_path):
    config = colour_app_config(tmp_path, policies={"budgets": [budget_rule(["onnx"], "review", 1.0)]})
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier})
    first = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "a"), None))
    second = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "b"), None))
    assert first.decision is Decision.ACCEPT
    assert [s.stage for s in second.trace] == ["input", "policy:budget", "privacy:redact", "review_queue"]
    assert second.degraded and second.detections is None and second.review_item_id
    item = run(service.review.get(None, second.review_item_id))
    assert item.kind == "budget"


# -- rollouts: the shadow after the response --------------------------------------------------------


class HeldTier:
    """A candidate tier that answers only once released."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.called: asyncio.Event | None = None
        self.release: asyncio.Event | None = None

    async def predict(self, image_rgb):
        self.called.set()
        await self.release.wait()
        return await self.inner.predict(image_rgb)

    async def describe(self):
        return await self.inner.describe()


def test_the_shadow_run_never_delays_the_response(tmp_path):
    config = rollout_config(tmp_path)
    cascade = config.cascades["colour"]

    def tier(stage):
        return LocalOnnxTier(stage.model_dump(), config.models_dir)

    held = HeldTier(tier(cascade.candidates["swapped"].tier))
    service = VisionRouteService.build(
        config,
        tiers={"colour": tier(cascade.tier)},
        candidate_tiers={"colour": {"swapped": held, "cheaper": tier(cascade.candidates["cheaper"].tier)}},
    )

    async def scenario():
        held.called, held.release = asyncio.Event(), asyncio.Event()
        started = await service.rollouts.start(
            ADMIN, {"task": "colour", "candidate": "swapped", "mode": "shadow", "fraction": 1.0}
        )
        analysis = await asyncio.wait_for(
            service.analyze.analyze(ImageRequest(solid_png((230, 20, 20)), "s-1"), None), 30
        )
        (step,) = [s for s in analysis.trace if s.stage == "rollout"]
        assert step.details["shadow"] is True and analysis.decision is Decision.ACCEPT
        # answered while the candidate is still held: the shadow runs off the request's path
        await asyncio.wait_for(held.called.wait(), 30)
        assert (await service.rollouts.status(started.id)).shadow["requests"] == 0
        held.release.set()
        await service.rollouts.drain()
        shadow = (await service.rollouts.status(started.id)).shadow
        assert shadow["requests"] == 1 and shadow["candidate_accepts"] == 1

    run(scenario())


def test_a_pipeline_without_a_spawner_runs_no_after_response_stage():
    class Wants(Ran):
        def wants(self, ctx):
            return True

    later = Wants()
    ctx = context()
    assert run(Pipeline(stages=(Ran(),), after_response=(later,)).run(ctx)) is ctx.analysis
    assert later.count == 0
