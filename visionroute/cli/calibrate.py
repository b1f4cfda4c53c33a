"""``visionroute calibrate``, ``visionroute eval`` and ``visionroute gate``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from visionroute import paths
from visionroute.errors import ConfigError


def _costs(text: str):
    from policies.risk_control import TierCosts

    try:
        pairs = dict(part.split("=", 1) for part in text.split(",") if part)
        return TierCosts(**{k.strip(): float(v) for k, v in pairs.items()})
    except Exception as exc:
        raise ConfigError(
            f"--costs must look like cheap=1,escalate=10,review=100; got {text!r} ({exc})", field="costs"
        ) from None


def _load_data(args):
    """The labelled data both commands work on, from whichever source the flags name."""
    from evals.harness import TierData, digits_tier_data

    if args.predictions:
        return TierData.from_npz(Path(args.predictions))
    if args.images:
        from evals.datasets import folder_tier_data

        if not args.model:
            raise ConfigError("--images needs --model (the ONNX classifier to evaluate)", field="model")
        return folder_tier_data(args.images, args.labels, model=args.model, strong_model=args.strong_model)
    if args.dataset != "digits":
        raise ConfigError(
            f"unknown dataset {args.dataset!r}; expected 'digits', or use --predictions / --images",
            field="dataset",
        )
    return digits_tier_data(args.seed)


def _calibrate_data(args, data):
    from evals.harness import calibrate
    from policies.certify import split_indices

    splits = split_indices(len(data), seed=args.seed, calibration_fraction=args.calibration_fraction)
    calibration = calibrate(
        data,
        splits.fit,
        splits.certify,
        method=args.method,
        alpha=args.alpha,
        delta=args.delta,
        costs=_costs(args.costs),
        p_value=args.p_value,
    )
    # Record how the items were split, so `eval` can hold out exactly the unseen ones.
    split = {
        "dataset_sha256": data.sha256,
        "seed": args.seed,
        "calibration_fraction": args.calibration_fraction,
        "n_fit": len(splits.fit),
        "n_certify": len(splits.certify),
    }
    certificate = {**calibration.calibrator.certificate, "split": split}
    return calibration, splits, certificate


def _cmd_from_production(args) -> int:
    """``calibrate --from-production``: one recalibration job over the service's own stores
    (router/services/recalibration.py): the task's production labels -> a certified artefact in
    the shared store -> a shadow rollout naming it. Exit 0 succeeded, 2 refused, 1 failed."""
    from policies.artefact_store import ArtefactStore
    from policies.review_queue import ReviewQueue
    from policies.reviewer_quality import distrusted_reviewers
    from policies.rollout_store import RolloutStore
    from router.serve_config import app_config
    from router.services.recalibration import Recalibration, recalibration_request
    from visionroute.errors import InputError

    if not args.task:
        raise ConfigError("--from-production needs --task (a cascade of the serve config)", field="task")
    from router.serve_config import REPO_CONFIG

    config = app_config(Path(args.config) if args.config else REPO_CONFIG)
    body = {
        "task": args.task,
        "tenant": args.tenant,
        "alpha": args.alpha,
        "delta": args.delta,
        "propose": not args.no_propose,
        "shadow_fraction": args.shadow_fraction,
        "audit_fraction": args.rollout_audit_fraction,
        "costs": _costs(args.costs).model_dump(),
        "serve_calibrator": args.serve_calibrator,
    }
    try:
        request = recalibration_request(body)
    except InputError as exc:
        raise ConfigError(str(exc), field=exc.field) from None
    home = config.review.path
    queue = ReviewQueue(home, default_lease_s=config.review.lease_s, state=config.state)
    artefacts = ArtefactStore(home / "artefacts.sqlite3", state=config.state)
    rollouts = RolloutStore(home / "rollouts.sqlite3", state=config.state)
    try:
        job = Recalibration(
            queue=queue,
            artefacts=artefacts,
            rollouts=rollouts,
            cascades=config.cascades,
            incumbent_thresholds=lambda task: config.policies.threshold_policy(
                task, config.cascades[task].policy
            ),
            distrusted_reviewers=lambda tenant: distrusted_reviewers(queue, config.policies, tenant=tenant),
        )
        try:
            job.check(request)
        except InputError as exc:
            raise ConfigError(str(exc), field=exc.field) from None
        status = job.run(request, "cli (calibrate --from-production)")
    finally:
        for store in (queue, artefacts, rollouts):
            store.close()
    print(f"recalibration {status['id']} of {args.task}: {status['status']}: {status['reason']}")
    for key in ("artefact_sha256", "rollout_id"):
        if status.get(key):
            print(f"  {key}: {status[key]}")
    details = status.get("details") or {}
    if details.get("thresholds"):
        t = details["thresholds"]
        print(
            f"  thresholds {t['version']}: accept >= {t['accept_threshold']:.6g}, escalate >= {t['escalate_threshold']:.6g}"
        )
        print(f"  {details.get('certificate', '')}")
        if details.get("calibrator"):
            print(f"  {details['calibrator']}")
    if details.get("needed_more") is not None:
        print(f"  needed: at least {details['needed_more']} more audit labels")
    return {"succeeded": 0, "refused": 2}.get(status["status"], 1)


def _cmd_calibrate(args) -> int:
    if args.from_production:
        return _cmd_from_production(args)
    if args.plan:
        return _cmd_plan(args)
    if args.router:
        return _cmd_router(args)
    data = _load_data(args)
    calibration, _, certificate = _calibrate_data(args, data)
    calibrator = calibration.calibrator.with_certificate(certificate)
    out = Path(args.out or paths.home() / "calibration" / f"{data.name}-{args.method}.json")
    calibrator.save(out)
    text = calibration.certificate.to_text()
    if calibration.plan is not None:
        plan = calibration.plan
        text += (
            "\nThree tiers (accept cheap / escalate to the strong tier / human review):\n"
            f"  accept when score >= {plan.accept_threshold:.6g}; escalate when score >= {plan.review_threshold:.6g}; "
            f"else review\n  {plan.certificate.statement()}\n  expected cost {plan.expected_cost_units:.3f} units/item, "
            f"rates {json.dumps({k: round(v, 4) for k, v in plan.rates.items()})}\n"
        )
    text += f"\nartefact {out} ({calibrator.artifact_id}); calibration data sha256 {calibrator.artifact.data_sha256}\n"
    cert_path = out.with_suffix(".certificate.txt")
    cert_path.write_text(text)
    print(text, end="")
    return 0


def _router_data(args):
    """The labelled items with both tiers' answers (and the uploads, where there are some)."""
    from evals.harness import digits_router_data, router_data_from_npz

    if args.predictions:
        return router_data_from_npz(Path(args.predictions))
    if args.images:
        raise ConfigError(
            "--router takes --predictions (an NPZ with the VLM's answers) or --dataset digits; "
            "--images has no VLM answers",
            field="images",
        )
    if args.dataset != "digits":
        raise ConfigError(
            f"unknown dataset {args.dataset!r}; expected 'digits', or use --predictions", field="dataset"
        )
    return digits_router_data(args.seed)


def _router_spec(args, data):
    """The feature blocks: --router-features, or every block the data allows."""
    from cascades.router_features import OUTPUT_TOP_K, FeatureSpec

    if args.neighbours < 1:
        raise ConfigError(f"--neighbours must be at least 1, got {args.neighbours}", field="neighbours")
    if args.served_rows < 1:
        raise ConfigError(f"--served-rows must be at least 1, got {args.served_rows}", field="served-rows")
    if args.router_features is None:
        features = {"output", "input", "neighbours"} if data.images is not None else {"output"}
    else:
        features = {f.strip() for f in args.router_features.split(",") if f.strip()}
    unknown = features - {"output", "input", "neighbours"}
    if unknown or "output" not in features:
        raise ConfigError(
            f"--router-features must list output and any of input, neighbours; got {args.router_features!r}",
            field="router-features",
        )
    if features - {"output"} and data.images is None:
        raise ConfigError(
            f"--router-features {args.router_features!r} needs the uploads (an 'images' array in the "
            "NPZ); the data has none: use --router-features output",
            field="router-features",
        )
    return FeatureSpec(
        output="classifier",
        top_k=min(OUTPUT_TOP_K, len(data.class_names), args.served_rows),
        use_input="input" in features,
        neighbours_k=args.neighbours if "neighbours" in features else 0,
    )


def _describe_plan(name: str, plan, held_out) -> list[str]:
    def threshold(value):
        return "never" if value is None or value == float("inf") else f"{value:.4g}"

    vlm = "its own" if plan.vlm_accept_threshold is None else f">= {threshold(plan.vlm_accept_threshold)}"
    cert = plan.document["certificate"]
    rates = {k: round(v, 4) for k, v in plan.document["rates"].items()}
    lines = [
        f"  {name} ({'router score' if plan.score == 'learned' else 'calibrated top-1 confidence'}): "
        f"accept >= {threshold(plan.accept_threshold)}, escalate >= {threshold(plan.escalate_threshold)}, "
        f"VLM accept {vlm}",
        f"    certification: rates {json.dumps(rates)}, accepted error {cert.get('empirical_risk', 0):.4f} "
        f"(upper bound {cert.get('risk_upper_bound', 1):.4f}), {plan.document['expected_cost_units']:.3f} units/item",
    ]
    if held_out is not None:
        lines.append(
            f"    held out ({held_out.n}): rates {json.dumps({k: round(v, 4) for k, v in held_out.rates.items()})}, "
            f"accepted error {held_out.accepted_error:.4f}, {held_out.cost_per_item:.3f} units/item"
        )
    return lines


def _cmd_router(args) -> int:
    """``calibrate --router``: fit and certify the learned router and both three-tier plans
    (cascades/router_calibration.py); write the router and the cheap tier's calibration, and
    print the serve-config lines that use them."""
    from cascades.router_calibration import calibrate_router
    from policies.certify import split_indices

    if args.max_review_share is not None and not 0.0 <= args.max_review_share <= 1.0:
        raise ConfigError(
            f"--max-review-share must be in [0, 1], got {args.max_review_share}", field="max-review-share"
        )
    data = _router_data(args)
    splits = split_indices(len(data.labels), seed=args.seed, calibration_fraction=args.calibration_fraction)
    result = calibrate_router(
        data,
        splits.fit,
        splits.certify,
        splits.test,
        alpha=args.alpha,
        delta=args.delta,
        costs=_costs(args.costs),
        max_review_share=args.max_review_share,
        method=args.method,
        spec=_router_spec(args, data),
        embedding_dim=args.embedding_dim,
        served_rows=args.served_rows,
        seed=args.seed,
    )
    home = paths.home() / "calibration"
    out = Path(args.router_out or home / f"{data.name}-router.json")
    calibration_out = Path(
        args.out or out.with_name(out.stem.removesuffix("-router") + "-cheap-calibration.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration_out.parent.mkdir(parents=True, exist_ok=True)
    fallback = result.artefact.plans.fallback
    certificate = {
        **fallback.document["certificate"],
        "three_tier": fallback.document | {"costs": _costs(args.costs).model_dump()},
        "split": {"seed": args.seed, "calibration_fraction": args.calibration_fraction, **result.sizes},
        "router": result.artefact.sha256,
    }
    calibration_path = result.calibrator.with_certificate(certificate).save(calibration_out)
    result.artefact.save(out)
    task = args.task or ("digits" if args.dataset == "digits" and not args.predictions else "classify")
    spec = result.artefact.spec
    lines = [
        f"learned router for {data.name}: {len(data.labels)} items split {json.dumps(result.sizes)}",
        f"  features: {', '.join(spec.names)}",
        f"  VLM score: {data.strong_score_name}",
        f"  alpha {args.alpha:g}, delta {args.delta:g}, costs {args.costs}"
        + (f", max review share {args.max_review_share:g}" if args.max_review_share is not None else ""),
    ]
    for name, plan in result.plans.items():
        lines += _describe_plan(name, plan, result.held_out.get(name))
        if not plan.feasible:
            lines.append(f"    WARNING: the {name} plan certified nothing: it accepts no cheap answer")
    lines += [
        f"router artefact {out} ({result.artefact.version})",
        f"cheap tier calibration {calibration_path} ({result.calibrator.artifact_id}); the router was fitted "
        "on this calibration: serve the tier with it",
        "serve config (cascades.<task>):",
        "  cascades:",
        f"    {task}:",
        f"      tier: {{calibration: {calibration_path}}}",
        f"      router: {{path: {out}}}",
    ]
    print("\n".join(lines))
    return 0


def _cmd_plan(args) -> int:
    """``calibrate --plan``: how many labelled items the target (alpha, delta) needs for a
    certificate with the wanted probability, resampling this labelled set as a pilot. Writes
    nothing; exit 1 when the target is out of reach."""
    from policies.certify import certify, certify_two_halves, plan_labels

    data = _load_data(args)
    prediction = data.cheap_probabilities.argmax(axis=1)
    # Certification depends on the order of the scores, which a monotone calibrator keeps, so
    # the plan resamples the cheap tier's top-1 confidence as it is.
    scores, is_error = data.cheap_probabilities.max(axis=1), prediction != data.labels
    print(
        f"pilot {data.name}: {len(data)} labelled items, cheap tier error rate {is_error.mean():.3f}; target: "
        f"error among accepted <= {args.alpha:g} with confidence {1 - args.delta:g}, certified with "
        f"probability >= {args.plan_probability:.0%} ({args.plan_reps} resamples of the pilot per size)"
    )
    options = dict(alpha=args.alpha, delta=args.delta, probability=args.plan_probability, reps=args.plan_reps)
    options |= dict(max_items=args.plan_max_items, seed=args.seed, p_value=args.p_value)
    plans = {
        name: plan_labels(scores, is_error, procedure=proc, **options)
        for name, proc in (("certify()", certify), ("two halves", certify_two_halves))
    }
    now = certify(
        scores,
        is_error,
        alpha=args.alpha,
        delta=args.delta,
        p_value=args.p_value,
        score_name="top-1 confidence",
    )
    if plans["certify()"].reachable:
        shares = {name: dict(zip(plan.sizes, plan.certified_share)) for name, plan in plans.items()}
        print(
            f"\n  {'labelled items':>14}  {'P(certified), certify()':>24}  {'two halves (calibrate today)':>29}"
        )
        for size in sorted(set(shares["certify()"]) | set(shares["two halves"])):
            cells = [f"{shares[name][size]:.2f}" if size in shares[name] else "-" for name in plans]
            print(f"  {size:>14}  {cells[0]:>24}  {cells[1]:>29}")
    print()
    for name, plan in plans.items():
        print(f"{name}: {plan.message}")
    print(f"\nwith the {len(data)} pilot items themselves, certify(): {now.statement()}")
    return 0 if plans["certify()"].needed is not None else 1


def _cmd_eval(args) -> int:
    from evals.gate import compare
    from evals.report import write_report

    out_dir = Path(args.out or paths.home() / "reports" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.traces:
        report = _replay_report(args)
    elif args.corruptions is not None:
        report = _robustness_report(args, out_dir)
    elif args.coco_gt:
        from evals.detection import evaluate_coco_files

        report = {
            "dataset": {"name": Path(args.coco_gt).stem, "n_test": None},
            "metrics": {"detector": evaluate_coco_files(args.coco_gt, args.coco_dt, slice_keys=_keys(args))},
        }
    else:
        report = _tier_report(args, out_dir)
    report["created_at"] = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    failures = None
    if args.baseline:
        failures = compare(report, json.loads(Path(args.baseline).read_text()), ratio=args.ratio)
        report["gate"] = {
            "baseline": args.baseline,
            "ratio": args.ratio,
            "passed": not failures,
            "failures": failures,
        }
    written = _write(report, out_dir, write_report)
    print(f"report: {written['markdown']} and {written['json']}")
    if failures:
        for failure in failures:
            print(f"REGRESSION: {failure}", file=sys.stderr)
        return 1
    return 0


def _write(report, out_dir, write_report):
    if "dataset" in report and "sha256" in report["dataset"]:
        return write_report(report, out_dir)
    # replay and COCO reports have no tier tables: JSON plus a short Markdown summary
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Evaluation report: {report['dataset']['name']}",
        "",
        "```json",
        json.dumps(report.get("metrics") or report.get("replay"), indent=2),
        "```",
    ]
    if report.get("gate"):
        lines += ["", f"Regression gate passed: **{report['gate']['passed']}**"] + [
            f"- {f}" for f in report["gate"]["failures"]
        ]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}


def _keys(args) -> tuple[str, ...]:
    return tuple(k for k in (args.slice_by or "").split(",") if k)


def _tier_report(args, out_dir: Path) -> dict:
    import numpy as np

    from cascades.calibration import load_calibration
    from evals.harness import Calibration, evaluate
    from policies.certify import split_indices
    from policies.risk_control import RiskCertificate, TierPlan

    data = _load_data(args)
    if args.calibration:
        calibrator = load_calibration(args.calibration)
        cert = calibrator.certificate or {}
        split = cert.get("split") or {}
        if split.get("dataset_sha256") == data.sha256:  # same data: hold out what calibration did not see
            test_rows = split_indices(
                len(data), seed=split["seed"], calibration_fraction=split["calibration_fraction"]
            ).test
        else:
            test_rows = np.arange(len(data))
        plan = _plan_from_certificate(cert, TierPlan, RiskCertificate)
        calibration = Calibration(calibrator, None, plan)  # type: ignore[arg-type]
    else:
        calibration, splits, certificate = _calibrate_data(args, data)
        calibration = Calibration(
            calibration.calibrator.with_certificate(certificate), calibration.certificate, calibration.plan
        )
        test_rows = splits.test
    keys = _keys(args) or (
        ("ink", "digit") if args.dataset == "digits" and not (args.predictions or args.images) else ()
    )
    return evaluate(data, calibration, test_rows, out_dir=out_dir, costs=_costs(args.costs), slice_keys=keys)


def _robustness_report(args, out_dir: Path) -> dict:
    """``eval --corruptions``: the clean report plus the robustness section (evals/corruptions.py),
    and the calibration artefact with the shift guard's input reference (calibration.json)."""
    from evals.corruptions import (
        evaluate_corruptions,
        parse_corruptions,
        parse_severities,
        robustness_plots,
    )
    from evals.harness import evaluate

    if args.predictions or args.calibration:
        flag = "--predictions" if args.predictions else "--calibration"
        raise ConfigError(
            f"--corruptions runs the tiers on corrupted images and calibrates on the clean ones in the same "
            f"run; {flag} cannot be used with it (use --dataset digits|faces or --images)",
            field="predictions" if args.predictions else "calibration",
        )
    corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    image_set = _image_set(args)
    result, context = evaluate_corruptions(
        image_set,
        corruptions=corruptions,
        severities=severities,
        seed=args.seed,
        calibration_fraction=args.calibration_fraction,
        method=args.method,
        alpha=args.alpha,
        delta=args.delta,
        costs=_costs(args.costs),
        p_value=args.p_value,
        false_alarm_rate=args.guard_false_alarm,
        guard_window=args.guard_window,
        progress=lambda text: print(f"corruptions: {text}", file=sys.stderr, flush=True),
    )
    calibration = context["calibration"]
    report = evaluate(
        context["clean"],
        calibration,
        context["test_rows"],
        out_dir=out_dir,
        costs=_costs(args.costs),
        slice_keys=_keys(args),
    )
    artefact = calibration.calibrator.save(Path(out_dir) / "calibration.json")
    result["calibration_artefact"] = str(artefact)
    report["robustness"] = result
    report["plots"].update(robustness_plots(result, out_dir))
    return report


def _image_set(args):
    """The labelled images ``--corruptions`` corrupts: digits, faces or the user's --images."""
    from evals import robustness_sets

    if args.images:
        if not args.model:
            raise ConfigError("--images needs --model (the ONNX classifier to evaluate)", field="model")
        return robustness_sets.folder_set(
            args.images, args.labels, model=args.model, strong_model=args.strong_model
        )
    if args.dataset == "digits":
        return robustness_sets.digits_set(args.seed)
    if args.dataset == "faces":
        return robustness_sets.faces_set(args.seed)
    raise ConfigError(
        f"unknown dataset {args.dataset!r} for --corruptions; expected 'digits' or 'faces', or use --images",
        field="dataset",
    )


def _plan_from_certificate(cert: dict, plan_type, certificate_type):
    """The ``TierPlan`` an artefact's certificate holds (``three_tier``, as ``TierPlan.to_dict``
    wrote it), with the strong tier's accept threshold: None (absent, or a plan made without the
    strong tier's scores) accepts every escalated answer; "inf" none."""
    tiers = cert.get("three_tier")
    if not tiers:
        return None
    inner = dict(tiers["certificate"])
    fields = certificate_type.__dataclass_fields__
    inner = {
        k: (float(v) if isinstance(v, str) and v in ("inf", "-inf") else v)
        for k, v in inner.items()
        if k in fields
    }
    vlm_accept = tiers.get("vlm_accept_threshold")
    return plan_type(
        float(tiers["accept_threshold"]),
        float(tiers["review_threshold"]),
        tiers["expected_cost_units"],
        tiers["rates"],
        certificate_type(**inner),
        None if vlm_accept is None else float(vlm_accept),
    )


def _replay_report(args) -> dict:
    from evals.replay import load_labels, read_traces, replay

    labels = load_labels(Path(args.labels)) if args.labels else None
    items = read_traces(Path(args.traces), labels)
    costs = _costs(args.costs)
    if args.router:
        from cascades.learned_router import RouterArtefact
        from evals.replay import replay_router

        result = replay_router(
            items,
            RouterArtefact.load(Path(args.router)),
            cheap_cost=costs.cheap,
            vlm_cost=costs.escalate,
            review_cost=costs.review,
            slice_keys=_keys(args),
        )
    else:
        result = replay(
            items,
            accept_threshold=args.accept_threshold,
            escalate_threshold=args.escalate_threshold,
            cheap_cost=costs.cheap,
            vlm_cost=costs.escalate,
            review_cost=costs.review,
            slice_keys=_keys(args),
        )
    # Expose the slices as a "replay" suite so the regression gate can compare them.
    return {
        "dataset": {"name": Path(args.traces).stem, "n_test": len(items)},
        "replay": result,
        "metrics": {"replay": result["slices"]},
    }


def _cmd_gate(args) -> int:
    from evals.gate import compare

    failures = compare(
        json.loads(Path(args.run).read_text()), json.loads(Path(args.baseline).read_text()), ratio=args.ratio
    )
    for failure in failures:
        print(f"REGRESSION: {failure}", file=sys.stderr)
    if not failures:
        print(f"gate passed: {args.run} is within {args.ratio:.0%} of {args.baseline} on every slice")
    return 1 if failures else 0


def _data_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("data (default: scikit-learn digits with the two trained tiers)")
    source.add_argument("--dataset", default="digits", help="built-in dataset (default: %(default)s)")
    source.add_argument(
        "--predictions",
        help="NPZ with probabilities (n,C), labels (n,), optional strong_probabilities, class_names",
    )
    source.add_argument(
        "--images", help="folder of images (with --labels CSV image,label[,metadata...], or class subfolders)"
    )
    source.add_argument(
        "--labels",
        help="labels file: CSV image,label for --images; request_id,label (CSV or JSON) for --traces",
    )
    source.add_argument("--model", help="ONNX classifier (path or prepared name) to run on --images")
    source.add_argument("--strong-model", help="a stronger ONNX classifier for the cascade comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.5,
        help="share of items used to calibrate; the rest is held out",
    )
    parser.add_argument("--method", default="temperature", choices=("temperature", "platt", "isotonic"))
    parser.add_argument("--alpha", type=float, default=0.05, help="target error rate among accepted items")
    parser.add_argument(
        "--delta", type=float, default=0.1, help="allowed probability that the guarantee fails"
    )
    parser.add_argument("--p-value", default="binomial", choices=("binomial", "hoeffding_bentkus"))
    parser.add_argument(
        "--costs", default="cheap=1,escalate=10,review=100", help="cost units per tier (default: %(default)s)"
    )


def register(subparsers, bench) -> None:
    calibrate = subparsers.add_parser(
        "calibrate", help="fit a calibrator, certify thresholds, write the artefact"
    )
    _data_args(calibrate)
    calibrate.add_argument(
        "--out", help="artefact path (default: $VISIONROUTE_HOME/calibration/<data>-<method>.json)"
    )
    plan = calibrate.add_argument_group(
        "planning (--plan): labelled items needed, estimated from this data as a pilot; writes nothing"
    )
    plan.add_argument(
        "--plan", action="store_true", help="print how many labelled items certify --alpha/--delta"
    )
    plan.add_argument(
        "--plan-probability", type=float, default=0.8, help="wanted probability of a certificate"
    )
    plan.add_argument("--plan-reps", type=int, default=100, help="resamples of the pilot per size")
    plan.add_argument(
        "--plan-max-items", type=int, default=20_000, help="the largest labelled set considered"
    )
    router = calibrate.add_argument_group(
        "learned router (--router): fit the router and certify its three-tier plan and the "
        "confidence-only fallback with the VLM's answers (docs/learned_router.md, Calibrate)"
    )
    router.add_argument(
        "--router", action="store_true", help="fit and certify the learned router; write its artefact"
    )
    router.add_argument(
        "--max-review-share",
        type=float,
        help="review capacity h: certified plans send at most this share to humans (infeasible: "
        "exit 2 with the smallest h that works)",
    )
    router.add_argument(
        "--router-out",
        help="router artefact path (default: $VISIONROUTE_HOME/calibration/<data>-router.json)",
    )
    router.add_argument("--task", help="the cascade the printed serve-config lines name (default: classify)")
    router.add_argument(
        "--router-features",
        help="feature blocks: output plus any of input, neighbours, which need the uploads "
        "(default: every block the data allows)",
    )
    router.add_argument(
        "--neighbours", type=int, default=10, help="k nearest reference items (default: %(default)s)"
    )
    router.add_argument(
        "--embedding-dim",
        type=int,
        default=64,
        help="reference embedding: the upload's pixels, grey s*s or RGB 3*s*s (default: %(default)s)",
    )
    router.add_argument(
        "--served-rows",
        type=int,
        default=5,
        help="answer rows the served classifier keeps (its decoder's top_k) (default: %(default)s)",
    )
    production = calibrate.add_argument_group(
        "from production (--from-production): recertify --task from the service's own labels "
        "(audit samples and reviews), store the artefact, propose it as a shadow rollout "
        "(docs/recertification.md, From production to a rollout); uses --alpha, --delta, --costs"
    )
    production.add_argument(
        "--from-production",
        action="store_true",
        help="run one recalibration job over the serve config's stores",
    )
    production.add_argument(
        "--config",
        default="serve_config.yaml",
        help="the Ray Serve config whose stores to read (default: %(default)s)",
    )
    production.add_argument("--tenant", help="recertify on this tenant's items only")
    production.add_argument("--no-propose", action="store_true", help="store the artefact, start no rollout")
    production.add_argument(
        "--serve-calibrator",
        action="store_true",
        help="serve the calibrator refit from these labels too: fitted on 30%% of the items, the "
        "thresholds certified after it on the rest (not for a task with a learned router)",
    )
    production.add_argument(
        "--shadow-fraction",
        type=float,
        default=0.1,
        help="the proposed rollout's shadow share (default: %(default)s)",
    )
    production.add_argument(
        "--rollout-audit-fraction",
        type=float,
        default=0.1,
        help="the proposed rollout's audit share of each arm's accepts (default: %(default)s)",
    )
    calibrate.set_defaults(func=_cmd_calibrate)

    evaluate = subparsers.add_parser("eval", help="evaluate and write a Markdown + JSON + PNG report")
    _data_args(evaluate)
    evaluate.add_argument(
        "--calibration", help="artefact from `visionroute calibrate` (default: calibrate in this run)"
    )
    evaluate.add_argument("--slice-by", help="comma-separated metadata keys to slice by")
    evaluate.add_argument("--out", help="report folder (default: $VISIONROUTE_HOME/reports/<timestamp>)")
    evaluate.add_argument("--baseline", help="baseline report.json: exit 1 naming the slice that regressed")
    evaluate.add_argument(
        "--ratio", type=float, default=0.9, help="a slice fails below this share of its baseline"
    )
    evaluate.add_argument("--traces", help="JSONL of Trace.to_dict() lines to replay a policy on")
    evaluate.add_argument("--accept-threshold", type=float, default=0.9, help="policy to replay on --traces")
    evaluate.add_argument(
        "--escalate-threshold", type=float, default=0.5, help="policy to replay on --traces"
    )
    evaluate.add_argument(
        "--router",
        help="a learned router artefact to replay on --traces: its score on the logged router features "
        "and its certified plans, beside the logged decisions",
    )
    robustness = evaluate.add_argument_group(
        "robustness (--corruptions): corrupted copies of the held-out images, with and without the shift guard"
    )
    robustness.add_argument(
        "--corruptions",
        nargs="?",
        const="all",
        help="'all' (the default with a bare --corruptions) or a comma list, e.g. gaussian_noise,jpeg; "
        "data: --dataset digits|faces or --images",
    )
    robustness.add_argument("--severities", help="comma list of 1..5 (default: all five)")
    robustness.add_argument(
        "--guard-false-alarm",
        type=float,
        default=0.01,
        help="the shift guard's false-alarm rate on clean inputs (default: %(default)s)",
    )
    robustness.add_argument(
        "--guard-window",
        type=int,
        default=50,
        help="inputs in the shift guard's two-sample window; 0: the per-request rule alone (default: %(default)s)",
    )
    evaluate.add_argument("--coco-gt", help="COCO annotations JSON (detection evaluation)")
    evaluate.add_argument("--coco-dt", help="COCO results JSON for --coco-gt")
    evaluate.set_defaults(func=_cmd_eval)

    gate = subparsers.add_parser("gate", help="compare a report.json with a baseline report.json (CI)")
    gate.add_argument("run")
    gate.add_argument("baseline")
    gate.add_argument("--ratio", type=float, default=0.9)
    gate.set_defaults(func=_cmd_gate)
