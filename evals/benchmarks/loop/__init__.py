"""The closed loop over time: ``visionroute bench loop`` (issue 23, "The figure").

A stream of items (default 50,000 digits) whose inputs shift mid-stream: a corruption's severity
ramps up from clean to ``--max-severity`` and stays there. The service answers about 14 items/s,
so the stream replays the tiers' recorded outputs instead: every held-out digit is run once
through the real cheap and second tiers (``evals.robustness_sets.digits_set``, ONNX) at every
severity of the corruption, with the shift guard's input statistics, and cached; a stream item
is a held-out digit drawn at random, at the severity in force at its position. ``--task
textures`` replays the second task's tiers instead (``replay.textures_replay``).

Every item goes through the same rules as the service: the three-tier plan (accept the cheap
answer, escalate to the second tier, review), the shift guard (``policies.shift_guard``: a
flagged would-be accept is escalated), the audit sampling of accepts at the audit fraction (the
label plan's, ``policies.recert_plan.plan_audit_fraction``), and the production certificate
(``policies.production_certify.certify_production_plan``: Horvitz-Thompson weighted, unlabelled
audits counted as errors; in the loop at ``LoopConfig.certificate_delta``, delta / 2 while it may
keep its running plan, so the deployed one of the two keeps delta, with ``--fit-share`` of the
labels placing the candidates). Reviewers have a known noise: a label is wrong (another class, at
random) with probability ``--reviewer-error``; an audit goes unlabelled with probability
``--nonresponse``. Three ways to run it, over the same stream:

- ``static``: the offline calibration (clean data) forever;
- ``static+guard``: the same, with the shift guard against the offline reference;
- ``loop``: the closed loop: after every window the plan is recertified from the reviews and
  audits of the last ``--label-windows`` windows (in the order they were queued) and, when the
  certificate is feasible, deployed for the next window together with a new input reference (the
  inputs it was certified on, so the guard now asks "unlike the data of this certificate?"); a
  drift alarm (the guard flags more than ``ALARM_SHARE`` of a window) raises the audit fraction
  ``--alarm-factor`` fold, within the audit budget, until the guard is quiet and a
  recertification has succeeded. The label window restarts whenever a window's inputs differ
  from the label window's before it (the guard with those inputs as its reference flags more
  than ``ALARM_SHARE``): older labels describe other inputs, and a certificate on a mixture
  holds for neither. From then until a recertification succeeds, no certificate covers the
  inputs the guard flags, the second tier's answers on them included: the loop sends them to
  review (the service's guard, as in ``static+guard``, escalates them). Within a window the
  loop acts at once: the drift alarm is also checked on the running count of the window's items
  (every ``--alarm-check-every`` items, ``stream.alarm_position``), and from the check that fires
  the rest of the window's flagged items go to review. A refused or infeasible recertification leaves the
  running plan in place (as the service's job does); so does one on a label window that restarted
  in this very window (its inputs were still moving: the certificate would describe inputs
  already gone). A new certificate of the same inputs as the running plan replaces it only when
  it is cheaper on the label window (both plans on the same sampled items) or when the labels
  that arrived since the running plan was deployed put its accepted error above alpha
  (``--no-keep-incumbent``: every certificate replaces it). The first certificate of new inputs re-plans the loop's audit
  fraction (``plan_audit_fraction`` on its labels; ``--no-replan``: the clean pilot's stays).

Labels are not in cost/1000: an answered audit is a human label of an accepted item; the
``+labels`` column and the ``*_with_labels`` fields add them at the review cost.

The baseline for the cost after the shift: a calibration fitted on the shifted data (iid, the
same number of labels as the loop's last certificate used; ``evals.harness.calibrate``,
calibrator refitted), evaluated on the same settled post-shift items.

Not simulated: the rollout test between a recertified artefact and the replicas (shadow, canary,
promotion); here a certified artefact serves from the next window on.

The modules, in the order a run uses them: ``config`` (``LoopConfig``, the severity schedule),
``replay`` (the tiers' recorded outputs: ``digits_replay``, ``textures_replay``), ``stream``
(the items, the routing rule, the guard, a window's row), ``recertify`` (the review queue, the
certificate, the keep rule, the audit fraction), ``simulate``, ``summary`` (phases, the shifted
baseline, the targets), ``report`` (table and plot) and ``cli``.
"""

from evals.benchmarks.loop.cli import add_arguments, main, register, run
from evals.benchmarks.loop.config import (
    ALARM_SHARE,
    PHASES,
    POLICIES,
    LoopConfig,
    phase_of,
    severity_schedule,
)
from evals.benchmarks.loop.replay import REPLAYS, Replay, digits_replay, load_replay, textures_replay
from evals.benchmarks.loop.report import format_result, plot
from evals.benchmarks.loop.simulate import simulate
from evals.benchmarks.loop.stream import Routed, alarm_position, route

__all__ = [
    "ALARM_SHARE",
    "PHASES",
    "REPLAYS",
    "POLICIES",
    "LoopConfig",
    "Replay",
    "Routed",
    "add_arguments",
    "alarm_position",
    "digits_replay",
    "format_result",
    "load_replay",
    "main",
    "phase_of",
    "plot",
    "register",
    "route",
    "run",
    "severity_schedule",
    "simulate",
    "textures_replay",
]
