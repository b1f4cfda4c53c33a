"""``visionroute policies check``: validate the policy sets in a serve config before deploying."""

from __future__ import annotations

from pathlib import Path


def _cmd_check(args) -> int:
    """Validate the policy sets in a serve config (args.policies and the Ingress user_config)."""
    import yaml

    from policies.policy_set import PolicySet, parse_policy_set
    from visionroute.errors import ConfigError

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", field="config")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", field="config") from None
    checked = 0
    for app in config.get("applications", []) or []:
        args_section = app.get("args") or {}
        tasks = sorted(args_section.get("cascades") or {"classify": 0, "text": 0})
        candidates = {"args.policies": args_section.get("policies")}
        for deployment in app.get("deployments", []) or []:
            if deployment.get("name") == "Ingress" and "user_config" in deployment:
                candidates["deployments.Ingress.user_config"] = deployment["user_config"]
        for where, data in candidates.items():
            if data is None:
                continue
            policy = parse_policy_set(data, tasks=tasks)  # raises ConfigError: exit 2 with the reason
            checked += 1
            print(
                f"{app.get('name')}: {where}: policy set {policy.version!r} is valid "
                f"({len(policy.budgets)} budgets; tasks {', '.join(tasks)})"
            )
        if all(data is None for data in candidates.values()):
            default = PolicySet()
            print(
                f"{app.get('name')}: no policy set configured (neither args.policies nor an Ingress "
                f"user_config): the built-in {default.version!r} applies ({len(default.budgets)} budgets, "
                "each cascade's own thresholds)"
            )
    if not config.get("applications"):
        print(f"{path}: no applications; nothing to check")
    print(f"{path}: {checked} policy set(s) checked, all valid")
    return 0


def register(subparsers, bench) -> None:
    policies = subparsers.add_parser(
        "policies", help="policy sets (thresholds, costs, budgets, review, audit)"
    )
    policy_commands = policies.add_subparsers(dest="policies_command", required=True)
    check = policy_commands.add_parser(
        "check", help="validate the policy sets in a serve config before deploying"
    )
    check.add_argument("config", help="serve config YAML")
    check.set_defaults(func=_cmd_check)
