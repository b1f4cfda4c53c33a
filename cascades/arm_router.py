"""Which learned router scores a request when a rollout arm carries its own (issue 23).

A recalibration of a routed task refits the router (router/services/recalibration.py) and
stores it in the artefact beside its thresholds; a rollout of that artefact serves the refit
router on the candidate arm (shadow, canary, promoted), and once promoted it is the incumbent's.
``RouterScoreStage`` asks ``arm_router`` which router scores the request; a shadow run, which
goes through ``run_cascade`` (no router stage of its own), goes through ``routed_cascade``.

A refit router is served only on the tier it was fitted for: ``rollout_router`` refuses one whose
labels, feature names or feature definitions (input, embedding, output block) differ from the
configured router's, naming the field. A feature failure on a candidate arm falls back to that
arm's own confidence-only plan (the stage reads the plans from the router it scores with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cascades.learned_router import RouterArtefact
from visionroute.errors import ConfigError
from visionroute.records import Analysis

if TYPE_CHECKING:  # router_stage imports this module: its names are imported where used
    from cascades.router_stage import ServedRouter

# the definitions a refit router must share with the configured one to be served on its tier
SPEC_FIELDS = ("output", "input_version", "embedding_version")


def arm_router(arm: Any, configured: ServedRouter) -> tuple[ServedRouter, bool]:
    """(the router that scores the request, whether the stage stands aside). The arm's own router
    when it carries one (a rollout's refit router, or the adopted incumbent artefact's); a
    candidate arm without one (a candidate tier or a thresholds-only artefact) is left to its
    own thresholds, as before routers were rolled out; otherwise the configured router."""
    own = getattr(arm, "router", None)
    if own is not None:
        return own, False
    choice = getattr(arm, "choice", None)
    return configured, choice is not None and choice.arm == "candidate"


def rollout_router(
    document: Any, configured: ServedRouter, *, field: str = "artefact.router"
) -> ServedRouter:
    """A stored artefact's router document, checked against the task's configured router and
    loaded for serving with the same price and time limit. ConfigError naming ``field.<key>``
    when it is corrupted or does not fit the tier."""
    from cascades.router_stage import ServedRouter

    if not isinstance(document, dict):
        raise ConfigError(f"{field}: expected a router document", field=field)
    body = {k: v for k, v in document.items() if k != "sha256"}
    try:
        artefact = RouterArtefact.from_document(body, class_names=configured.artefact.class_names)
    except ConfigError as exc:
        key = exc.field.removeprefix("router") if exc.field else ""
        raise ConfigError(f"{field}: {exc.reason}", field=f"{field}{key}") from None
    if "sha256" in document and document["sha256"] != artefact.sha256:
        raise ConfigError(
            f"{field}.sha256 {str(document['sha256'])[:12]} is not the document's ({artefact.sha256[:12]}): "
            "the stored router was altered",
            field=f"{field}.sha256",
        )
    if artefact.spec.names != configured.artefact.spec.names:
        raise ConfigError(
            f"{field}.features: its feature names {list(artefact.spec.names)} are not the configured "
            f"router's {list(configured.artefact.spec.names)}",
            field=f"{field}.features.names",
        )
    for key in SPEC_FIELDS:
        mine, served = getattr(artefact.spec, key), getattr(configured.artefact.spec, key)
        if mine != served:
            raise ConfigError(
                f"{field}.features.{key} is {mine!r}; the configured router's is {served!r} "
                "(the served features would not be the fitted ones)",
                field=f"{field}.features.{key}",
            )
    return ServedRouter.from_artefact(
        artefact, field=field, cost_units=configured.cost_units, timeout_s=configured.timeout_s
    )


async def routed_cascade(
    analysis: Analysis,
    *,
    cheap_tier: Any,
    policy: Any,
    router: ServedRouter,
    shift_guard: Any = None,
) -> Analysis:
    """``run_cascade`` with ``router`` scoring between the cheap tier and the decision (a shadow
    run of a refit router: no VLM, as every shadow run)."""
    from cascades.pipeline import CASCADE_STAGES, CascadeRun
    from cascades.router_stage import RouterScoreStage

    state = CascadeRun(analysis, cheap_tier, policy, None, shift_guard)
    stages = (CASCADE_STAGES[0], RouterScoreStage({analysis.task: router}), *CASCADE_STAGES[1:])
    for stage in stages:
        await stage.run(state)
    return state.analysis
