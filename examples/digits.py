"""``visionroute example digits``: the three-tier cascade on the digits, built, certified, served.

    cheap ONNX digits model  ->  the LLaVA trained on the digits (real vLLM server)  ->  a human

One command does every step, each through the code the service itself runs:
1. prepares ``digits_cheap`` and trains (or reuses) the digits LLaVA, and starts its vLLM server;
2. renders the calibration and certification digits as the images a client would upload
   (``render_digit``: 28x28 RGB) and runs both tiers on them: the cheap tier through
   ``OnnxStage`` (the service's preprocessing: resize to 8x8 grey), the VLM through ``VlmStage``
   and the real server (the service's request, image and JSON schema);
3. fits both calibrators on the calibration split: temperature scaling for the cheap classifier
   (``fit_classifier``; it never changes the answer) and Platt on the VLM's logprob confidence
   (``fit_detector``: the VLM reports only its answer's probability);
4. certifies the three thresholds (cheap accept, review, VLM accept) on the certification split
   with ``policies.risk_control.choose_tier_thresholds``: candidates ordered on the calibration
   split, tested on the certification split (Learn then Test with Pareto Testing);
5. writes both artefacts, each carrying the certificate, and a serve config from
   ``serve_config.digits.yaml`` that takes both accept thresholds from it, then ``serve run``s it.

The held-out split (539 digits) is left for traffic; tests/integration/test_three_tier_digits.py
sends it through the service. docs/vlm.md, "The three-tier digits example".
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascades.vlm.config import VlmConfig
from examples.train_digits import LABELS, SEED
from visionroute import paths

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "serve_config.digits.yaml"
TASK = "digits"
VLM_CALIBRATION_METHOD = "platt"
ALPHA, DELTA = 0.05, 0.1
CHEAP_ARTEFACT, VLM_ARTEFACT = "cheap_calibration.json", "vlm_calibration.json"


def default_work_dir() -> Path:
    return paths.data_dir() / "example-digits"


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class DigitsVlmSplit:
    """The 1,797 digits, split once by ``seed``: ``cascades.digits.load_split`` takes the training
    share (the one the digits tiers and the VLM learn from), ``policies.certify.split_indices``
    divides the rest into calibration (fit), certification and held-out traffic, as the
    harness does for the digits tiers."""

    seed: int
    n_train: int
    images: np.ndarray  # (n_pool, 8, 8) float32 in [0, 1]: every item not used in training
    labels: np.ndarray  # (n_pool,) int64
    calibration: np.ndarray  # rows of images/labels
    certification: np.ndarray
    held_out: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {
            "training": self.n_train,
            "calibration": len(self.calibration),
            "certification": len(self.certification),
            "held_out": len(self.held_out),
        }


def digits_vlm_split(seed: int = SEED) -> DigitsVlmSplit:
    from cascades.digits import load_split
    from policies.certify import split_indices

    split = load_split(seed)
    rows = split_indices(len(split.labels_pool), seed=seed)
    return DigitsVlmSplit(
        seed,
        len(split.labels_train),
        split.images_pool[:, 0],
        split.labels_pool,
        rows.fit,
        rows.certify,
        rows.test,
    )


def digits_vlm_config(endpoint: str, model: str, **overrides: Any) -> VlmConfig:
    """The classify task over the labels "0".."9": the request the digits LLaVA was trained on."""
    settings: dict[str, Any] = dict(
        endpoint=endpoint,
        model=model,
        task="classify",
        labels=LABELS,
        max_tokens=16,
        request_timeout_s=60.0,  # generous: a loaded CI machine, and the first call compiles the schema
        total_timeout_s=120.0,
    )
    return VlmConfig(**{**settings, **overrides})


# --------------------------------------------------------------------------- the two tiers


def rendered(images: np.ndarray) -> list[np.ndarray]:
    """8x8 digits as the 28x28 RGB images a client uploads (what the VLM was trained on)."""
    from examples.train_digits import render_digit

    return [render_digit(image) for image in images]


def cheap_stage(models_dir: Path, calibration: Path | None = None):
    """The service's cheap tier for the digits cascade (``OnnxStage``), optionally calibrated."""
    from cascades.models import DIGITS_NAME
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig

    config = OnnxStageConfig(model=DIGITS_NAME, calibration=str(calibration) if calibration else None)
    return OnnxStage(config, models_dir=models_dir)


def cheap_answers(stage, images_rgb: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(score, predicted class id) per image, as the service scores them: the policy's ``top1``
    rule over the stage's (calibrated) detections; the answer is the row with that score."""
    from policies.thresholds import answer_score

    detections, _ = stage.predict(images_rgb)
    scores = np.array([answer_score(d, "top1") for d in detections], np.float64)
    predicted = np.array([int(d.class_id[int(d.confidence.argmax())]) for d in detections], np.int64)
    return scores, predicted


def cheap_probabilities(stage, images_rgb: list[np.ndarray]) -> np.ndarray:
    """(n, 10) class probabilities of the stage's model on its own preprocessing: what the
    temperature is fitted on (the stage's answer keeps only the top k classes)."""
    from scipy.special import softmax

    tensors = np.concatenate([stage.decoder.preprocess(image)[0] for image in images_rgb])
    scores = np.asarray(stage.model.run(tensors)[0], np.float64)
    return softmax(scores, axis=1) if stage.decoder.outputs == "logits" else scores


def vlm_answers(endpoint: str, model: str, model_version: str | None, images_rgb, *, concurrency: int = 8):
    """The VLM's answers and raw logprob confidences through ``VlmStage`` and the real server."""
    from cascades.vlm.stage import VlmStage
    from visionroute.records import Analysis

    stage = VlmStage(
        digits_vlm_config(endpoint, model, model_version=model_version, max_concurrency=concurrency)
    )

    def one(item):
        index, image = item
        return stage.run(Analysis(image, f"{index:064x}", "classify")).trace.steps[-1]

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            steps = list(pool.map(one, enumerate(images_rgb)))
    finally:
        stage.close()
    predicted = np.array(
        [
            LABELS.index(s.details["answer"]) if s.error is None and s.details.get("answer") in LABELS else -1
            for s in steps
        ],
        np.int64,
    )
    raw = np.array([np.nan if s.score is None or p < 0 else s.score for s, p in zip(steps, predicted)])
    return raw, predicted


# --------------------------------------------------------------------------- build


@dataclass
class ExampleBuild:
    """What ``build_example`` wrote and measured."""

    work_dir: Path
    models_dir: Path
    cheap_calibration: Path
    vlm_calibration: Path
    plan: Any  # policies.risk_control.TierPlan
    certificate: dict[str, Any]  # the document both artefacts carry
    split_sizes: dict[str, int]
    accuracy: dict[str, float] = field(default_factory=dict)  # on calibration + certification
    # What the plan was certified from (policies.risk_control.TierOutcomes), per split: re-plan
    # at another alpha or cost with choose_tier_thresholds without asking the VLM again.
    outcomes: dict[str, Any] = field(default_factory=dict)  # "calibration", "certification"
    # Both tiers' raw answers on the same calibration + certification digits, for fitting a
    # learned router with the served VLM (evals/benchmarks/cascade_learned.py): "rows" (of
    # digits_vlm_split(seed)), "n_fit", "seed", "labels", "probabilities" (the cheap model's,
    # uncalibrated), "vlm_answers" (class id, -1: none), "vlm_scores" (calibrated, NaN: none).
    answers: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        plan = self.plan
        cert = plan.certificate
        lines = [
            f"three-tier digits example in {self.work_dir}",
            f"  split: {self.split_sizes}",
            f"  accuracy on the calibration + certification digits: cheap {self.accuracy['cheap']:.3f}, "
            f"VLM {self.accuracy['vlm']:.3f}",
            f"  thresholds (calibrated scores): cheap accept >= {plan.accept_threshold:.4g}, "
            f"review below {plan.review_threshold:.4g}, VLM accept >= {plan.vlm_accept_threshold:.4g}",
            f"  rates on the certification split: {json.dumps({k: round(v, 3) for k, v in plan.rates.items()})}",
            f"  {cert.statement()}",
            f"  accepted error on the certification split {cert.empirical_risk:.4f}, upper bound "
            f"{cert.risk_upper_bound:.4f} (alpha {cert.alpha:g}, delta {cert.delta:g})",
            f"  artefacts: {self.cheap_calibration.name}, {self.vlm_calibration.name}",
        ]
        return "\n".join(lines)


def build_example(
    work_dir: Path,
    *,
    vlm_endpoint: str,
    vlm_model: str,
    vlm_model_version: str | None,
    models_dir: Path | None = None,
    alpha: float = ALPHA,
    delta: float = DELTA,
    costs: Any = None,
    concurrency: int = 8,
    seed: int | None = None,
) -> ExampleBuild:
    """Steps 2-4 of the module docstring, against a running VLM server; writes both artefacts."""
    from cascades.calibration import arrays_sha256, fit_classifier, fit_detector
    from cascades.models import DIGITS_NAME, prepare_models
    from cascades.vlm.calibration import calibrated_confidence
    from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds

    costs = costs or TierCosts()
    work_dir = Path(work_dir).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    models_dir = Path(models_dir or work_dir / "models").expanduser().resolve()
    split = digits_vlm_split(SEED if seed is None else seed)
    prepare_models(models_dir, [DIGITS_NAME])

    n_fit = len(split.calibration)
    rows = np.concatenate([split.calibration, split.certification])
    fit, test = np.arange(n_fit), np.arange(n_fit, len(rows))
    labels = split.labels[rows]
    images = rendered(split.images[rows])

    # The cheap tier: temperature scaling fitted on the calibration split (it never changes the
    # answer; per-class Platt maps can reorder a classifier's classes), then the calibrated
    # scores exactly as the service computes them (the stage applies the artefact).
    uncalibrated = cheap_stage(models_dir)
    cheap_info = {"name": DIGITS_NAME, "version": uncalibrated.version}
    probabilities = cheap_probabilities(uncalibrated, images)
    cheap_calibrator = fit_classifier(
        "temperature", probabilities[fit], labels[fit], LABELS, model=cheap_info
    )
    cheap_path = cheap_calibrator.save(work_dir / CHEAP_ARTEFACT)
    cheap_score, cheap_predicted = cheap_answers(cheap_stage(models_dir, cheap_path), images)
    cheap_error = cheap_predicted != labels

    # The VLM through the real server; its calibrator fitted on the calibration split's answers.
    vlm_answers(vlm_endpoint, vlm_model, vlm_model_version, images[:concurrency], concurrency=concurrency)
    vlm_raw, vlm_predicted = vlm_answers(
        vlm_endpoint, vlm_model, vlm_model_version, images, concurrency=concurrency
    )
    answered = ~np.isnan(vlm_raw)
    fit_answered = fit[answered[fit]]
    vlm_calibrator = fit_detector(
        VLM_CALIBRATION_METHOD,
        vlm_raw[fit_answered],
        vlm_predicted[fit_answered],
        vlm_predicted[fit_answered] == labels[fit_answered],
        LABELS,
        model={"name": vlm_model, "version": vlm_model_version or ""},
    )
    strong_score = np.array(
        [
            calibrated_confidence(vlm_calibrator, raw, int(answer)) if ok else np.nan
            for raw, answer, ok in zip(vlm_raw, vlm_predicted, answered)
        ]
    )
    strong_error = vlm_predicted != labels  # no answer counts as wrong (it is never accepted)

    outcomes = TierOutcomes(cheap_score, cheap_error, strong_error, strong_score)
    plan = choose_tier_thresholds(
        outcomes.subset(fit), outcomes.subset(test), costs=costs, alpha=alpha, delta=delta
    )
    # The plan's certificate is the artefacts' top-level one: router.config.certified_policy
    # reads "feasible" there and the thresholds under "three_tier".
    document = {
        **plan.certificate.to_dict(),
        "three_tier": plan.to_dict() | {"costs": costs.model_dump()},
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "certify_data_sha256": arrays_sha256(
            cheap_score[test].astype(np.float32), cheap_error[test], strong_score[test], strong_error[test]
        ),
        "split": {"seed": split.seed, "fit": "calibration", "certify": "certification", **split.sizes()},
    }
    cheap_path = cheap_calibrator.with_certificate(document).save(work_dir / CHEAP_ARTEFACT)
    vlm_path = vlm_calibrator.with_certificate(document).save(work_dir / VLM_ARTEFACT)
    return ExampleBuild(
        work_dir,
        models_dir,
        cheap_path,
        vlm_path,
        plan,
        document,
        split.sizes(),
        {"cheap": float((~cheap_error).mean()), "vlm": float((~strong_error).mean())},
        {"calibration": outcomes.subset(fit), "certification": outcomes.subset(test)},
        {
            "rows": rows,
            "n_fit": n_fit,
            "seed": split.seed,
            "labels": labels,
            "probabilities": probabilities,
            "vlm_answers": vlm_predicted,
            "vlm_scores": strong_score,
        },
    )


# --------------------------------------------------------------------------- the serve config


def serve_document(
    build: ExampleBuild,
    *,
    http_port: int,
    vlm_endpoint: str,
    vlm_model: str,
    vlm_model_version: str | None,
    template: Path = TEMPLATE,
) -> dict[str, Any]:
    """``serve_config.digits.yaml`` with absolute paths into the work dir and the actual ports."""
    import yaml

    document = yaml.safe_load(Path(template).read_text())
    document["http_options"]["port"] = int(http_port)
    args = document["applications"][0]["args"]
    args["models_dir"] = str(build.models_dir)
    args["review"]["path"] = str(build.work_dir / args["review"]["path"])
    cascade = args["cascades"][TASK]
    cascade["tier"]["calibration"] = str(build.cheap_calibration)
    vlm = cascade["vlm"]
    vlm.update(endpoint=vlm_endpoint, model=vlm_model, calibration=str(build.vlm_calibration))
    if vlm_model_version:
        vlm["model_version"] = vlm_model_version
    return document


def write_serve_config(document: dict[str, Any], path: Path) -> Path:
    """Write and validate (as ``visionroute check-config``): a bad artefact fails here, naming it."""
    import yaml

    from router.serve_config import check_serve_config

    path = Path(path)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    check_serve_config(path)
    return path


# --------------------------------------------------------------------------- the command


def run(args) -> int:
    """``visionroute example digits``: build everything, then serve until SIGTERM / Ctrl-C."""
    from examples import vllm_server
    from examples.train_digits import SERVED_MODEL_NAME
    from router.serve_config import load_serve_document
    from router.serve_runner import endpoints_of, run_serve

    for noisy in ("httpx", "httpx2"):  # one line per VLM request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work_dir = Path(args.work_dir).expanduser().resolve()
    python = vllm_server.ensure_vllm_venv()
    model_dir = vllm_server.ensure_digits_llava(python=python)
    version = vllm_server.model_version(model_dir)
    with vllm_server.start_vllm_server(
        model_dir,
        served_model_name=SERVED_MODEL_NAME,
        python=python,
        port=args.vlm_port,
        max_num_seqs=args.concurrency,
    ) as vllm:
        print(f"vLLM server for {SERVED_MODEL_NAME} ({version}) ready on {vllm.base_url}", flush=True)
        build = build_example(
            work_dir,
            vlm_endpoint=vllm.base_url,
            vlm_model=SERVED_MODEL_NAME,
            vlm_model_version=version,
            models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
            alpha=args.alpha,
            delta=args.delta,
            concurrency=args.concurrency,
        )
        print(build.summary(), flush=True)
        document = serve_document(
            build,
            http_port=args.port,
            vlm_endpoint=vllm.base_url,
            vlm_model=SERVED_MODEL_NAME,
            vlm_model_version=version,
        )
        config = write_serve_config(document, work_dir / "serve_config.yaml")
        print(f"serve config: {config}", flush=True)
        if args.build_only:
            return 0
        return run_serve(config, endpoints_of(load_serve_document(config)), ready_timeout_s=600.0)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--port", type=int, default=8000, help="HTTP port of the service (default: %(default)s)"
    )
    parser.add_argument(
        "--vlm-port", type=int, default=8100, help="port of the vLLM server (default: %(default)s)"
    )
    parser.add_argument(
        "--work-dir",
        default=str(default_work_dir()),
        help="artefacts, serve config, review queue (default: %(default)s)",
    )
    parser.add_argument(
        "--models-dir", default=None, help="where digits_cheap is prepared (default: WORK_DIR/models)"
    )
    parser.add_argument("--alpha", type=float, default=ALPHA, help="target error among accepted items")
    parser.add_argument("--delta", type=float, default=DELTA, help="failure probability of the certificate")
    parser.add_argument("--concurrency", type=int, default=8, help="VLM requests in flight while calibrating")
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="build, certify and write the config, then stop (no Ray Serve)",
    )
    parser.set_defaults(func=run)
