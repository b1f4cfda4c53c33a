"""Which learned router scores a request when a rollout arm carries its own (issue 23).

A recalibration of a routed task refits the router (router/services/recalibration.py) and
stores it in the artefact beside its thresholds; a rollout of that artefact serves the refit
router on the candidate arm (shadow, canary, promoted), and once promoted it is the incumbent's.
``RouterScoreStage`` asks ``arm_router`` which router scores the request. Loading and checking a
refit router, and the shadow run that scores with it: cascades/rollout_router.py. A feature
failure on a candidate arm falls back to that arm's own confidence-only plan (the stage reads
the plans from the router it scores with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # router_stage imports this module (cascades/rollout_router.py loads routers)
    from cascades.router_stage import ServedRouter


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
