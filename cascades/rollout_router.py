"""A rollout's refit learned router (issue 23): loaded from a stored calibration artefact and
checked against the task's configured router (``rollout_router``), and the shadow run that
scores with it (``routed_cascade``: ``run_cascade`` has no router stage).

A refit router is served only on the tier it was fitted for: ``rollout_router`` refuses one whose
labels, feature names or feature definitions (output block, input block, embedding) differ from
the configured router's, or whose stored sha256 is not its document's, naming the field.
"""

from __future__ import annotations

from typing import Any

from cascades.learned_router import RouterArtefact
from cascades.pipeline import CASCADE_STAGES, CascadeRun
from cascades.router_stage import RouterScoreStage, ServedRouter
from visionroute.errors import ConfigError
from visionroute.records import Analysis

# the definitions a refit router must share with the configured one to be served on its tier
SPEC_FIELDS = ("output", "input_version", "embedding_version")


def rollout_router(
    document: Any, configured: ServedRouter, *, field: str = "artefact.router"
) -> ServedRouter:
    """A stored artefact's router document, checked against the task's configured router and
    loaded for serving with the same price and time limit. ConfigError naming ``field.<key>``
    when it is corrupted or does not fit the tier."""

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

    state = CascadeRun(analysis, cheap_tier, policy, None, shift_guard)
    stages = (CASCADE_STAGES[0], RouterScoreStage({analysis.task: router}), *CASCADE_STAGES[1:])
    for stage in stages:
        await stage.run(state)
    return state.analysis
