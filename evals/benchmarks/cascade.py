"""``visionroute bench cascade``: the three-tier digits cascade's cost-accuracy frontier, one run.

One run builds the digits example as ``visionroute example digits`` does (the trained LLaVA on
its real vLLM server, both calibrators, the three certified thresholds, the serve config;
examples/digits.py), starts that service (``serve run``: Ray Serve), then:

1. **through the service**: sends the held-out digits over HTTP (``--concurrency`` clients) and
   records per item the decision, the path (cheap-accepted / VLM-answered / review), the answer,
   the cost units the service charged, the client-side latency, and from the trace the cheap
   tier's answer and calibrated confidence and, when escalated, the VLM's;
2. **counterfactual**: asks the same vLLM server directly (``VlmStage``, as ``vlm-digits`` does)
   for the items the service did not escalate, so that every held-out item has a VLM answer;
3. **policies** from those per-item records (``policy_rows``): cheap only; VLM only; cheap ->
   VLM by confidence (the certified cheap accept threshold only, every VLM answer accepted);
   the certified three-tier policy (what the service did); random routing at the service's VLM
   share (expected value); an oracle router (cheap when it is right, else the VLM when it is
   right, else a human). Only the certified rows are measured through the service; the others
   are computed from the same items' recorded answers;
4. **learned-certified** (issue 22): a learned router fitted and certified on the build's own
   answers (the served LLaVA's) on the calibration/certification digits, served by a second
   service from the same build; the same held-out digits through it give its row, priced with
   the features' cost in the cheap tier's (evals/benchmarks/cascade_learned.py).

Costs per item follow the cascade's cost model (policies.risk_control.TierCosts): every item
pays the cheap tier (VLM only excepted), each VLM call pays the VLM, each human review pays the
review. Two price lists: the certificate's (the costs the three-tier plan was chosen under,
read from the artefact) and the units the service charged (read from the traces: the digits
config prices VLM tokens at 0 and a review at the policy set's ``review_units``).

Also: the accepted error on held-out items against alpha (95% Clopper-Pearson interval) and the
certificate's bound, for both certified rows,
RouteLLM's APGR and CPT(50%, 80%, 95%) of the confidence ranking beside random and optimal
routing (``routing_figures``), and latency p50/p95 per path. docs/vlm.md, "bench cascade".
"""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evals.benchmarks.cascade_rows import (  # noqa: F401 (PATHS, ItemRecord: this module's API too)
    CI_CONFIDENCE,
    NO_ANSWER,
    PATHS,
    ItemRecord,
    PolicyRow,
    Prices,
    Records,
    accepted_error,
    accepted_error_ci,
    latency_by_path,
    policy_rows,
    replay_agreement,
    routing_figures,
    service_prices,
    threshold_sweep,
)
from visionroute import paths

log = logging.getLogger(__name__)


# The e2e test's alpha (tests/integration/test_three_tier_digits.py): at the example's 0.05 the
# certified plan for seed 0 accepts every VLM answer and reviews nothing, so the three-tier row
# would equal cheap -> VLM and the review path would have no latency to measure.
DEFAULT_ALPHA = 0.04


def default_work_dir() -> Path:
    return paths.data_dir() / "bench-cascade"


def _threshold(value: float | None) -> str:
    return "any answer (no VLM threshold)" if value is None else f"{value:.4g}"


def format_report(figures: dict[str, Any]) -> str:
    rows: list[PolicyRow] = figures["rows"]
    p, s = figures["prices"], figures["service_prices"]
    lines = [
        f"three-tier digits cascade, {figures['n_items']} held-out digits, one run "
        f"(service {figures['service_url']}, vLLM {figures['vlm_model']} {figures['vlm_model_version']})",
        f"  thresholds (certified, calibrated scores): cheap accept >= {figures['thresholds']['accept']:.4g}, "
        f"review below {figures['thresholds']['review']:.4g}, VLM accept >= {_threshold(figures['thresholds']['vlm_accept'])}",
        f"  prices per item: certificate cheap {p.cheap:g} / VLM call {p.vlm:g} / review {p.review:g}; "
        f"service-charged cheap {s.cheap:g} / VLM call {s.vlm:g} / review {s.review:g}",
        "",
        f"  {'policy':<34} {'measured':<15} {'accuracy (auto)':>15} {'cheap':>7} {'VLM':>7} {'human':>7} "
        f"{'cost/1000':>10} {'cost/1000 service units':>24}",
    ]
    for row in rows:
        lines.append(
            f"  {row.name:<34} {row.measured:<15} {row.accuracy:>15.4f} {row.share['cheap']:>7.3f} "
            f"{row.share['vlm']:>7.3f} {row.share['human']:>7.3f} {row.cost_per_1000:>10.0f} "
            f"{row.cost_per_1000_service:>24.0f}"
        )
    err = figures["accepted_error"]
    lat = figures["latency"]
    routing = figures.get("routing")
    if routing:
        lines += [
            "",
            "  RouteLLM's figures (two-model curves, cheap vs VLM, every answer accepted; no human tier):",
        ]
        for name, r in routing.items():
            cpt = "  ".join(f"CPT({k}) {v:.3f}" for k, v in r["cpt"].items())
            lines.append(f"    {name:<11} APGR {r['apgr']:.3f}  {cpt}")
    lines += [
        "",
        "  measured: service = sent through the running service (its decisions, answers, charged units);",
        "  counterfactual = computed from the same items' recorded cheap and VLM answers (the VLM asked",
        f"  directly for the {figures['n_direct']} items the service did not escalate); expected = random routing's",
        "  expected value. accuracy (auto) = share right among the items answered without a human;",
        "  cheap / VLM / human = share of items answered by each; cost/1000 at the certificate's prices;",
        "  the service row's service units are as charged (sum of response cost_units).",
        f"  routing replayed from the traces' scores with the certified plan agrees on "
        f"{figures['replay_agreement']}/{figures['n_items']} items",
        "",
        f"  accepted error through the service: {err['rate']:.4f} ({err['errors']} wrong of {err['accepted']} "
        f"accepted){_ci_text(err)} vs alpha {err['alpha']:g}; certificate (certification split, delta {err['delta']:g}): "
        f"empirical {err['certified_empirical']:.4f}, upper bound {err['certified_upper_bound']:.4f}",
    ]
    if figures.get("learned"):
        from evals.benchmarks.cascade_learned import report_lines

        lines += report_lines(figures["learned"])
    lines += [
        "",
        f"  latency through the service ({figures['concurrency']} clients, client-side):",
    ]
    for path, label in (("cheap", "cheap-accepted"), ("vlm", "VLM-answered"), ("review", "review")):
        f = lat[path]
        lines.append(f"    {label:<15} n={f['n']:<4} p50 {f['p50_ms']:8.1f} ms   p95 {f['p95_ms']:8.1f} ms")
    return "\n".join(lines)


def _ci_text(err: dict[str, Any]) -> str:
    if "ci" not in err:
        return ""
    return f", {err['ci_confidence']:.0%} CI [{err['ci'][0]:.4f}, {err['ci'][1]:.4f}]"


def plot_frontier(path: Path, records: Records, rows: list[PolicyRow], prices: Prices) -> Path:
    from evals.plots import frontier_plot

    curves = {"cheap -> VLM, cheap threshold swept": threshold_sweep(records, prices)}
    points = {f"{row.name} ({row.measured})": (row.cost_per_1000 / 1000.0, row.accuracy) for row in rows}
    return frontier_plot(
        path,
        curves,
        points,
        title=f"Digits cascade, {records.n} held-out items (accuracy of automatic answers)",
        x_label=f"cost units per item (cheap {prices.cheap:g}, VLM {prices.vlm:g}, review {prices.review:g})",
    )


# --------------------------------------------------------------------------- the service


@contextmanager
def running_service(config: Path, log_path: Path, *, ready_timeout_s: float = 600.0) -> Iterator[str]:
    """``serve run config`` in the background, as ``visionroute serve`` starts it
    (router/serve_runner.py: its environment and stop sequence); yields the base URL."""
    from router.serve_config import load_serve_document
    from router.serve_runner import _preexec, _stop, child_environment, endpoints_of, ready

    endpoints = endpoints_of(load_serve_document(config))
    env, notes = child_environment()
    for note in notes:
        print(f"note: {note}", flush=True)
    command = [str(Path(sys.executable).with_name("serve")), "run", str(config)]
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready(endpoints.probe_url):
            if child.poll() is not None:
                raise RuntimeError(f"serve run exited with {child.returncode}; log {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready after {ready_timeout_s:g} s; log {log_path}")
            time.sleep(1.0)
        yield endpoints.probe_url.removesuffix("/readyz")
    finally:
        _stop(child)


def _png(image_rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _step(body: dict[str, Any], stage: str) -> dict[str, Any] | None:
    return next((s for s in body["trace"]["steps"] if s["stage"] == stage), None)


def _label_id(label: Any) -> int:
    from examples.train_digits import LABELS

    return LABELS.index(str(label)) if str(label) in LABELS else NO_ANSWER


def record_from_response(body: dict[str, Any], label: int, latency_ms: float, task: str) -> ItemRecord:
    """An ``ItemRecord`` from one /v1/analyze response (its trace)."""
    onnx, policy, vlm = _step(body, f"onnx:{task}"), _step(body, "policy:thresholds"), _step(body, "vlm")
    review = _step(body, "review_queue")
    accepted = body["decision"] == "accept"
    path = ("vlm" if vlm is not None else "cheap") if accepted else "review"
    answer = _label_id(max(body["answer"], key=lambda a: a["confidence"])["label"]) if accepted else NO_ANSWER
    vlm_answer, vlm_score = NO_ANSWER, math.nan
    if vlm is not None and vlm["error"] is None:
        vlm_answer = _label_id(vlm["details"].get("answer"))
        vlm_score = float(vlm["details"].get("calibrated_score", math.nan))
    cheap_ok = onnx is not None and onnx.get("error") is None
    router = _step(body, "router")
    applied = router is not None and (router.get("details") or {}).get("applied", False)
    router_details = (router or {}).get("details") or {}
    fallback = bool(applied and router_details.get("fallback"))
    cheap_score = float(policy["score"]) if policy and policy.get("score") is not None else math.nan
    if applied and not fallback:  # the policy decided on the router's score, not the cheap top-1
        cheap_score = float(onnx["score"]) if cheap_ok and onnx.get("score") is not None else math.nan
    features_ms = (router_details.get("pricing") or {}).get("features_ms")
    return ItemRecord(
        label=int(label),
        path=path,
        escalated=vlm is not None,
        answer=answer,
        cost_units=float(body["cost_units"]),
        latency_ms=latency_ms,
        cheap_answer=_label_id(onnx["details"]["label"]) if cheap_ok else NO_ANSWER,
        cheap_score=cheap_score,
        vlm_answer=vlm_answer,
        vlm_score=vlm_score,
        vlm_source="service",
        cheap_cost_units=float(onnx["cost_units"]) if onnx else 0.0,
        vlm_cost_units=float(vlm["cost_units"]) if vlm else 0.0,
        review_cost_units=float(review["cost_units"]) if review else 0.0,
        router_score=float(router["score"]) if applied and router.get("score") is not None else math.nan,
        router_fallback=fallback,
        router_cost_units=float(router.get("cost_units") or 0.0) if applied else 0.0,
        router_features_ms=float(features_ms) if features_ms is not None else math.nan,
    )


def send_through_service(url: str, images_rgb, labels, *, task: str, concurrency: int) -> list[ItemRecord]:
    import httpx

    with httpx.Client(timeout=300.0, limits=httpx.Limits(max_connections=concurrency)) as client:

        def one(item: tuple[np.ndarray, int]) -> ItemRecord:
            image, label = item
            data = _png(image)
            started = time.perf_counter()
            response = client.post(
                f"{url}/v1/analyze", files={"image": ("digit.png", data, "image/png")}, data={"task": task}
            )
            latency_ms = (time.perf_counter() - started) * 1000.0
            if response.status_code != 200:
                raise RuntimeError(f"/v1/analyze answered {response.status_code}: {response.text[:500]}")
            return record_from_response(response.json(), label, latency_ms, task)

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, zip(images_rgb, labels)))


def with_direct_vlm_answers(
    records: list[ItemRecord],
    images_rgb,
    *,
    endpoint: str,
    model: str,
    version: str,
    calibration: Path,
    concurrency: int,
) -> list[ItemRecord]:
    """Fill in the VLM's answer (and calibrated confidence) for the items the service did not
    escalate, asking the same vLLM server through ``VlmStage`` (``example_digits.vlm_answers``)."""
    from dataclasses import replace

    from cascades.calibration import load_calibration
    from cascades.vlm.calibration import calibrated_confidence
    from examples.digits import vlm_answers

    missing = [i for i, r in enumerate(records) if not r.escalated]
    if not missing:
        return records
    raw, predicted = vlm_answers(
        endpoint, model, version, [images_rgb[i] for i in missing], concurrency=concurrency
    )
    calibrator = load_calibration(calibration)
    out = list(records)
    for i, score, answer in zip(missing, raw, predicted):
        valid = not math.isnan(score) and answer >= 0
        out[i] = replace(
            records[i],
            vlm_answer=int(answer) if valid else NO_ANSWER,
            vlm_score=calibrated_confidence(calibrator, float(score), int(answer)) if valid else math.nan,
            vlm_source="direct",
        )
    return out


# --------------------------------------------------------------------------- the command


def measure_learned(
    build, url: str, figures: dict[str, Any], learned, *, limit, concurrency: int
) -> dict[str, Any]:
    """The held-out digits (the same ones, in the same order) through the learned router's
    service; adds its row to ``figures["rows"]`` and its figures under ``"learned"``."""
    from evals.benchmarks.cascade_learned import learned_figures
    from examples.digits import TASK, digits_vlm_split, rendered
    from examples.train_digits import SEED

    split = digits_vlm_split(SEED)
    held_out = split.held_out[:limit]
    warm = split.calibration[:concurrency]
    send_through_service(
        url, rendered(split.images[warm]), split.labels[warm], task=TASK, concurrency=concurrency
    )
    started = time.perf_counter()
    items = send_through_service(
        url, rendered(split.images[held_out]), split.labels[held_out], task=TASK, concurrency=concurrency
    )
    records = Records(items)
    learned_part = learned_figures(
        records, learned, prices=figures["prices"], service=figures["service_prices"]
    )
    rows = list(figures["rows"])
    rows.insert(4, learned_part["row"])  # beside the confidence-certified row
    return figures | {
        "rows": rows,
        "learned": learned_part | {"service_url": url, "service_seconds": time.perf_counter() - started},
        "learned_records": records,
    }


def measure(build, url: str, *, vlm_endpoint: str, vlm_model: str, vlm_version: str, limit, concurrency: int):
    """Steps 1-3 of the module docstring against a running service; the figures as a dict."""
    from examples.digits import TASK, digits_vlm_split, rendered
    from examples.train_digits import SEED
    from policies.costs import CostModel

    split = digits_vlm_split(SEED)
    held_out = split.held_out[:limit]
    images, labels = rendered(split.images[held_out]), split.labels[held_out]
    # Warm-up on calibration digits (not held-out): the first requests pay one-off start costs.
    warm = split.calibration[:concurrency]
    send_through_service(
        url, rendered(split.images[warm]), split.labels[warm], task=TASK, concurrency=concurrency
    )
    started = time.perf_counter()
    items = send_through_service(url, images, labels, task=TASK, concurrency=concurrency)
    service_s = time.perf_counter() - started
    items = with_direct_vlm_answers(
        items,
        images,
        endpoint=vlm_endpoint,
        model=vlm_model,
        version=vlm_version,
        calibration=build.vlm_calibration,
        concurrency=concurrency,
    )
    records = Records(items)
    plan, cert = build.plan, build.plan.certificate
    costs = build.certificate["three_tier"]["costs"]
    prices = Prices(cheap=costs["cheap"], vlm=costs["escalate"], review=costs["review"])
    service = service_prices(records, review_default=CostModel().review_units)
    rows = policy_rows(records, accept_threshold=plan.accept_threshold, prices=prices, service=service)
    wrong, accepted = accepted_error(records)
    ci = accepted_error_ci(wrong, accepted)
    return {
        "n_items": records.n,
        "service_url": url,
        "service_seconds": service_s,
        "concurrency": concurrency,
        "vlm_model": vlm_model,
        "vlm_model_version": vlm_version,
        "thresholds": {
            "accept": plan.accept_threshold,
            "review": plan.review_threshold,
            "vlm_accept": plan.vlm_accept_threshold,
        },
        "prices": prices,
        "service_prices": service,
        "rows": rows,
        "n_direct": int((~records.escalated).sum()),
        "replay_agreement": replay_agreement(records, plan),
        "accepted_error": {
            "rate": wrong / accepted if accepted else math.nan,
            "errors": wrong,
            "accepted": accepted,
            "alpha": cert.alpha,
            "delta": cert.delta,
            "certified_empirical": cert.empirical_risk,
            "certified_upper_bound": cert.risk_upper_bound,
            "ci": list(ci),
            "ci_confidence": CI_CONFIDENCE,
        },
        "latency": latency_by_path(records),
        "routing": routing_figures(records),
        "records": records,
    }


def run(args) -> int:
    """Build the example, start vLLM and the service, measure, stop both (also on error/Ctrl-C)."""
    from examples import vllm_server
    from examples.digits import build_example, serve_document, write_serve_config
    from examples.train_digits import SERVED_MODEL_NAME

    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {args.limit}")
    work_dir = Path(args.work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds like Ctrl-C
    try:
        python = vllm_server.ensure_vllm_venv()
        model_dir = vllm_server.ensure_digits_llava(python=python)
        version = vllm_server.model_version(model_dir)
        with vllm_server.start_vllm_server(
            model_dir, served_model_name=SERVED_MODEL_NAME, python=python, max_num_seqs=args.concurrency
        ) as vllm:
            print(f"vLLM server for {SERVED_MODEL_NAME} ({version}) ready on {vllm.base_url}", flush=True)
            build = build_example(
                work_dir,
                vlm_endpoint=vllm.base_url,
                vlm_model=SERVED_MODEL_NAME,
                vlm_model_version=version,
                alpha=getattr(args, "alpha", DEFAULT_ALPHA),
                concurrency=args.concurrency,
            )
            print(build.summary(), flush=True)
            document = serve_document(
                build,
                http_port=vllm_server.free_port(),
                vlm_endpoint=vllm.base_url,
                vlm_model=SERVED_MODEL_NAME,
                vlm_model_version=version,
            )
            config = write_serve_config(document, work_dir / "serve_config.yaml")
            with running_service(config, work_dir / "serve.log") as url:
                print(f"service ready on {url}; sending the held-out digits", flush=True)
                figures = measure(
                    build,
                    url,
                    vlm_endpoint=vllm.base_url,
                    vlm_model=SERVED_MODEL_NAME,
                    vlm_version=version,
                    limit=args.limit,
                    concurrency=args.concurrency,
                )
            if not getattr(args, "no_learned", False):
                try:
                    figures = _learned_pass(build, document, figures, work_dir, args)
                except BaseException:  # keep the confidence-certified figures already measured
                    print(format_report(figures), flush=True)
                    raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(figures))
    plot = Path(args.plot).expanduser() if args.plot else work_dir / "cascade_frontier.png"
    plot_frontier(plot, figures["records"], figures["rows"], figures["prices"])
    print(f"  frontier plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(figures), indent=2, default=float))
        print(f"  figures: {args.json}")
    return 0


def _learned_pass(
    build, document: dict[str, Any], figures: dict[str, Any], work_dir: Path, args
) -> dict[str, Any]:
    """The learned-certified row: fit and certify the router on the build's own answers, serve
    the same build with it (a second service, the same vLLM server), send the same held-out
    digits (evals/benchmarks/cascade_learned.py)."""
    from evals.benchmarks.cascade_learned import fit_learned_router, learned_serve_document
    from examples import vllm_server
    from examples.digits import write_serve_config

    learned = fit_learned_router(build, work_dir)
    plan = learned.learned_plan
    print(
        f"learned router {learned.result.artefact.version}: cheap accept >= {plan.accept_threshold:.4g}, "
        f"review below {plan.escalate_threshold:.4g}, VLM accept >= {plan.vlm_accept_threshold}",
        flush=True,
    )
    learned_document = learned_serve_document(document, learned)
    learned_document["http_options"]["port"] = vllm_server.free_port()
    config = write_serve_config(learned_document, work_dir / "serve_config.learned.yaml")
    with running_service(config, work_dir / "serve.learned.log") as url:
        print(f"learned-router service ready on {url}; sending the held-out digits", flush=True)
        return measure_learned(build, url, figures, learned, limit=args.limit, concurrency=args.concurrency)


def to_json(figures: dict[str, Any]) -> dict[str, Any]:
    records: Records = figures["records"]
    skip = ("records", "rows", "prices", "service_prices", "learned", "learned_records")
    out = {k: v for k, v in figures.items() if k not in skip}
    items = [asdict(item) for item in records.items]
    learned: Records | None = figures.get("learned_records")
    if learned is not None:  # per item the router's score and path through the learned service
        out["learned"] = {k: v for k, v in figures["learned"].items() if k != "row"} | {
            "row": asdict(figures["learned"]["row"])
        }
        for item, other in zip(items, learned.items):
            item.update(
                router_score=other.router_score,
                router_fallback=other.router_fallback,
                router_cost_units=other.router_cost_units,
                learned_path=other.path,
                learned_answer=other.answer,
                learned_cost_units=other.cost_units,
            )
    return out | {
        "prices": asdict(figures["prices"]),
        "service_prices": asdict(figures["service_prices"]),
        "rows": [asdict(row) for row in figures["rows"]],
        "items": items,
    }
