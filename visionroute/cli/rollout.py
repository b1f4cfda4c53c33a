"""``visionroute rollout start|status|promote|rollback|finish``: the running service's rollouts.

Every command goes through the admin API (router/http/rollouts.py) of the running service at
``--url`` (default ``$VISIONROUTE_URL`` or http://127.0.0.1:8000) with an admin key
(``--api-key`` or ``$VISIONROUTE_API_KEY`` when the service has keys): a change takes effect on
every replica within ``rollouts.refresh_s``, with no restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionroute.client import ServiceClient, add_service_arguments, client_of


def _client(args) -> ServiceClient:
    return client_of(args, timeout_s=60.0)


def _print_status(status: dict[str, Any]) -> None:
    test = status["test"]
    print(f"rollout {status['id']}  task {status['task']}  {status['mode']}  status {status['status']}")
    print(f"  candidate: {status['candidate'] or '-'}  policy: {status['policy_version'] or '-'}")
    print(f"  serving:   {status['serving']}")
    print(
        f"  test:      {test['decision']}: {test['reason']}  (alpha {test['alpha']}, delta {test['delta']})"
    )
    for arm, figures in test["arms"].items():
        rate = "-" if figures["rate"] is None else f"{figures['rate']:.4f}"
        cost = "-" if figures["mean_cost"] is None else f"{figures['mean_cost']:.4g}"
        print(
            f"  {arm:<10} labelled {figures['labelled']:>5}  errors {figures['errors']:>4}  rate {rate}  "
            f"bounds [{figures['lower']:.4f}, {figures['upper']:.4f}]  mean cost {cost} "
            f"({figures['cost_observations']} requests)"
        )
    if "shadow" in status:
        shadow = status["shadow"]
        print(
            f"  shadow:    {shadow['requests']} requests, same decision {shadow['same_decision']}, "
            f"candidate accepts {shadow['candidate_accepts']}"
        )
    for event in status.get("events", []):
        print(f"  event:     {event['at']:.0f} {event['action']} by {event['actor']}: {event['reason']}")


def _show(args, status: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _policy_file(path: Path) -> dict[str, Any]:
    """A policy set from a YAML or JSON file (the service validates it and names any bad key)."""
    import yaml

    from visionroute.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"policy file {str(path)!r} does not exist", field="policy")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML or JSON: {exc}", field="policy") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a policy set (a mapping)", field="policy")
    return data


def _artefact(value: str) -> str:
    """The sha256 a rollout names: given as is, or computed from an artefact's JSON file (the
    canonical text's digest, as the store keys it). The service serves only artefacts a
    recalibration job stored, so a file names one and never uploads thresholds."""
    import re

    from policies.artefact_store import canonical, sha256_of
    from visionroute.errors import ConfigError

    if re.fullmatch(r"[0-9a-f]{64}", value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--artefact {value!r} is neither a sha256 (64 lowercase hex digits) nor an artefact file",
            field="artefact",
        )
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"artefact file {str(path)!r} is not readable JSON: {exc}", field="artefact"
        ) from None
    if not isinstance(body, dict) or "task" not in body or "version" not in body:
        raise ConfigError(
            f"artefact file {str(path)!r} must hold a calibration artefact (an object with task and version)",
            field="artefact",
        )
    return sha256_of(canonical(body))


def _start(args) -> int:
    body: dict[str, Any] = {
        "task": args.task,
        "mode": args.mode,
        "fraction": args.fraction,
        "sticky_by": args.sticky_by,
        "audit_fraction": args.audit_fraction,
        "alpha": args.alpha,
        "delta": args.delta,
        "reason": args.reason,
    }
    if args.candidate:
        body["candidate"] = args.candidate
    if args.policy:
        body["policy"] = _policy_file(Path(args.policy))
    if args.artefact:
        body["artefact"] = _artefact(args.artefact)
    return _show(args, _client(args).call("POST", "/v1/rollouts", json=body))


def _status(args) -> int:
    client = _client(args)
    if args.rollout_id:
        return _show(args, client.call("GET", f"/v1/rollouts/{args.rollout_id}"))
    listing = client.call("GET", "/v1/rollouts", params={"task": args.task} if args.task else None)
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    if not listing["rollouts"]:
        print("no rollouts")
    for rollout in listing["rollouts"]:
        print(
            f"{rollout['id']}  {rollout['task']:<12} {rollout['mode']:<7} {rollout['status']:<12} "
            f"{rollout['candidate'] or rollout['policy_version']}  {rollout['test']['decision']}: "
            f"{rollout['test']['reason']}"
        )
    return 0


def _decide(args) -> int:
    body = {"reason": args.reason} if args.reason else None
    path = f"/v1/rollouts/{args.rollout_id}/{args.rollout_command}"
    return _show(args, _client(args).call("POST", path, json=body))


def register(subparsers, bench) -> None:
    rollout = subparsers.add_parser("rollout", help="shadow and canary rollouts in the running service")
    commands = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")

    def common(parser) -> None:
        add_service_arguments(parser, key_help="an admin API key")
        parser.add_argument("--json", action="store_true", help="print the service's whole answer as JSON")

    start = commands.add_parser(
        "start",
        help="run a candidate beside the incumbent (shadow or canary)",
        description="The candidate is a tier declared under cascades.<task>.candidates (deployed with "
        "`serve deploy`), a policy set file, a stored calibration artefact, or a combination. The "
        "sequential test promotes or rolls it back; a promoted artefact becomes the task's incumbent.",
    )
    start.add_argument("--task", required=True)
    start.add_argument("--candidate", help="a name under cascades.<task>.candidates")
    start.add_argument("--policy", help="a candidate policy set (YAML or JSON file)")
    start.add_argument(
        "--artefact",
        help="a calibration artefact a recalibration job stored: its sha256, or its JSON file "
        "(docs/recertification.md; e.g. an earlier incumbent's, to go back to it)",
    )
    start.add_argument("--mode", choices=["shadow", "canary"], default="shadow")
    start.add_argument("--fraction", type=float, default=0.1, help="share of traffic, in (0, 1]")
    start.add_argument("--sticky-by", choices=["tenant", "request"], default="tenant")
    start.add_argument(
        "--audit-fraction", type=float, default=0.1, help="share of each arm's accepts audited"
    )
    start.add_argument("--alpha", type=float, default=0.05)
    start.add_argument("--delta", type=float, default=0.05)
    start.add_argument("--reason", default="", help="why (kept in the audit log)")
    common(start)
    start.set_defaults(func=_start)

    status = commands.add_parser("status", help="one rollout (bounds, evidence, audit log) or the list")
    status.add_argument("rollout_id", nargs="?")
    status.add_argument("--task", help="list only this task's rollouts")
    common(status)
    status.set_defaults(func=_status)

    for action, text in (
        ("promote", "promote the candidate now (an audited operator override)"),
        ("rollback", "send all traffic back to the incumbent now"),
        ("finish", "end a promoted rollout once its candidate is deployed as the incumbent"),
    ):
        parser = commands.add_parser(action, help=text)
        parser.add_argument("rollout_id")
        parser.add_argument("--reason", default="", help="why (kept in the audit log)")
        common(parser)
        parser.set_defaults(func=_decide)
