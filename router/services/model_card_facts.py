"""What a model card reads: the model file and its sidecar, a VLM's build manifest, calibration
artefacts with their certificate, eval reports; and the limitations those facts imply.

Every reader returns what it found or says what is missing; none raises for a file that is
absent or unreadable (a card describes the deployment as it is, gaps included).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascades.onnx_stage import OnnxStageConfig
from cascades.vlm.config import VlmConfig
from policies.thresholds import ThresholdPolicy
from router.services.model_card_schema import (
    CalibrationSection,
    CertificateSummary,
    EvaluationSection,
    LabelSet,
    Provenance,
)
from visionroute.errors import ConfigError

CERTIFICATE_KEYS = (
    "alpha",
    "delta",
    "n",
    "coverage",
    "threshold",
    "risk_upper_bound",
    "n_accepted",
    "n_errors",
    "method",
    "p_value_method",
    "statement",
    "split",
    "created_at",
)
# The report suite that holds a tier's metrics (evals/harness.py ``evaluate``).
SUITES = {"cheap": ("cheap_calibrated", "cheap_raw"), "strong": ("strong",)}
ROBUSTNESS_KEYS = ("corruption", "severity", "n", "accuracy", "ece", "mean_confidence")
MAX_REPORTS_SCANNED = 500  # newest first; older reports are not read


# --------------------------------------------------------------------------- the ONNX file


@dataclass
class CheapTierFacts:
    provenance: Provenance
    inputs: dict[str, Any] = field(default_factory=dict)
    labels: LabelSet | None = None
    sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # become limitations


def locate_model(model: str, models_dir: Path) -> tuple[Path | None, str]:
    """The model file this config names, without downloading anything; (None, why) if absent."""
    from cascades.models import PACKAGED_MODELS

    if model.startswith("hf://"):
        parts = model.removeprefix("hf://").split("/")
        if len(parts) < 3:
            return None, f"hub model must look like hf://owner/repo/file.onnx, got {model!r}"
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache("/".join(parts[:2]), "/".join(parts[2:]))
        except Exception as exc:  # huggingface_hub raises several kinds for a bad id
            return None, f"hub model, cache lookup failed: {type(exc).__name__}"
        if isinstance(cached, str):
            return Path(cached), "hub model, in the local hub cache"
        return None, "hub model, not in the local hub cache (downloaded at deploy)"
    path = Path(model).expanduser()
    if path.suffix == ".onnx" or path.is_absolute() or "/" in model:
        return (path, "file") if path.is_file() else (None, f"file {model!r} does not exist")
    prepared = models_dir / f"{model}.onnx"
    if prepared.is_file():
        return prepared, f"prepared in {models_dir}"
    if model in PACKAGED_MODELS:
        return None, f"not prepared in {models_dir}: run `visionroute models prepare`"
    return None, f"unknown model {model!r}: not prepared in {models_dir} and not a packaged model"


@functools.lru_cache(maxsize=32)
def _file_facts(path: str, size: int, mtime_ns: int, stage_config: str) -> dict[str, Any]:
    """ONNX file, sidecar and resolved settings; keyed by size and mtime so a replaced file is re-read."""
    from cascades.onnx_runner import OnnxModel
    from cascades.onnx_stage import resolve_settings

    model = OnnxModel(path, providers=["CPUExecutionProvider"], intra_op_threads=1)
    facts: dict[str, Any] = {
        "sha256": model.sha256,
        "version": model.version,
        "file_metadata": dict(model.file_metadata),
        "metadata": dict(model.metadata),
        "input_shape": list(model.input.shape),
        "output_shapes": model.output_shapes,
        "settings_error": None,
    }
    try:
        settings = resolve_settings(OnnxStageConfig.model_validate_json(stage_config), model)
    except ConfigError as exc:
        facts["settings_error"] = f"{exc.field}: {exc.reason}" if exc.field else exc.reason
    else:
        facts.update(
            decoder=settings.decoder,
            labels=list(settings.labels),
            options=settings.options,
            option_sources=settings.sources,
        )
    return facts


def _source_package(version: str | None) -> str | None:
    """``rapidocr-onnxruntime==1.4.4:ch_PP-OCRv4_det_infer.onnx`` -> ``rapidocr-onnxruntime==1.4.4``."""
    return next((part for part in (version or "").split(":") if "==" in part), None)


def cheap_tier_facts(tier: OnnxStageConfig, models_dir: Path) -> CheapTierFacts:
    from cascades.models import PACKAGED_MODELS

    path, status = locate_model(tier.model, models_dir)
    provenance = Provenance(configured=tier.model, status=status, description=PACKAGED_MODELS.get(tier.model))
    out = CheapTierFacts(provenance)
    if path is None:
        out.problems.append(f"the model file is not here ({status}); this card cannot say what it is")
        return out
    stat = path.stat()
    try:
        facts = _file_facts(str(path), stat.st_size, stat.st_mtime_ns, tier.model_dump_json())
    except ConfigError as exc:  # not a model ONNX Runtime can load: say so, with the file's hash
        from cascades.onnx_runner import file_sha256

        provenance.location, provenance.sha256 = str(path), file_sha256(path)
        provenance.status += "; ONNX Runtime cannot load it"
        out.problems.append(f"ONNX Runtime cannot load the file: {exc.reason}")
        return out
    metadata, file_metadata = facts["metadata"], facts["file_metadata"]
    sidecar = path.with_suffix(".json")
    recorded = metadata.get("sha256") if sidecar.is_file() else None
    provenance.location = str(path)
    provenance.version = facts["version"]
    provenance.sha256 = facts["sha256"]
    provenance.sha256_recorded = recorded
    provenance.source_package = _source_package(str(metadata.get("version") or ""))
    provenance.licence = metadata.get("licence") or metadata.get("license")
    provenance.description = provenance.description or metadata.get("description")
    provenance.details = {
        key: file_metadata[key] for key in ("author", "date", "task", "stride") if key in file_metadata
    }
    out.sources.append(f"ONNX file {path} (sha256 computed now)")
    if sidecar.is_file():
        out.sources.append(f"sidecar {sidecar}")
    if recorded and recorded != facts["sha256"]:
        provenance.status += "; CHANGED since prepared"
        out.problems.append(
            f"the file no longer matches the sha256 its sidecar recorded ({recorded[:16]}...): "
            "it was replaced or modified after `visionroute models prepare`"
        )
    if not provenance.licence:
        out.problems.append("no licence is recorded in the file or a sidecar: check it before use")
    out.inputs = {
        "onnx_input_shape": facts["input_shape"],
        "onnx_output_shapes": facts["output_shapes"],
    }
    if facts["settings_error"]:
        out.problems.append(f"the serving stage would refuse this config: {facts['settings_error']}")
        return out
    out.inputs.update(
        decoder=facts["decoder"], preprocess=facts["options"], preprocess_sources=facts["option_sources"]
    )
    if facts["labels"]:
        out.labels = LabelSet(
            count=len(facts["labels"]),
            names=facts["labels"],
            source=facts["option_sources"].get("labels"),
        )
    return out


# --------------------------------------------------------------------------- a VLM


def vlm_facts(vlm: VlmConfig) -> tuple[Provenance, list[str]]:
    """Served model, where, version; a local model directory's ``visionroute_build.json``."""
    from cascades.vlm.manifest import MANIFEST, read_manifest

    location = (
        vlm.endpoint if vlm.backend == "openai" or vlm.in_process is None else vlm.in_process.model_path
    )
    provenance = Provenance(
        configured=vlm.model,
        location=location,
        status=f"served by an OpenAI-compatible server at {vlm.endpoint}"
        if vlm.backend == "openai"
        else "vLLM engine inside the service",
        version=vlm.model_version,
    )
    sources = ["config (cascade vlm section)"]
    model_dir = Path(vlm.in_process.model_path).expanduser() if vlm.in_process is not None else None
    manifest = read_manifest(model_dir) if model_dir is not None and model_dir.is_dir() else None
    if manifest is not None:
        sources.append(f"build manifest {model_dir / MANIFEST}")
        provenance.sha256_recorded = manifest.get("weights_sha256")
        provenance.version = provenance.version or (
            f"{manifest.get('build_version')}@sha256:{str(manifest.get('weights_sha256', ''))[:16]}"
        )
        provenance.licence = manifest.get("licence")
        provenance.details = {
            key: manifest[key]
            for key in (
                "build_version",
                "served_model_name",
                "parameters",
                "n_train",
                "train_accuracy",
                "versions",
            )
            if key in manifest
        }
    return provenance, sources


def vlm_limitations(
    vlm: VlmConfig, provenance: Provenance, calibration: CalibrationSection | None
) -> list[str]:
    out = []
    if not provenance.licence:
        out.append("the licence of the served weights is not recorded here: check it before use")
    if vlm.task == "classify":
        out.append(
            f"answers only with one of its {len(vlm.labels)} configured labels (a JSON schema forces it)"
        )
    out.append(
        f"images are downscaled to at most {vlm.image_max_side} px on the longer side before it sees them"
    )
    if vlm.model_version is None and vlm.in_process is None:
        out.append(
            "no model_version is configured: traces cannot tell which weights the server ran; set "
            "vlm.model_version (e.g. a weights checksum)"
        )
    if calibration is None:
        out.append("its confidence is uncalibrated: the accept threshold promises no error rate")
    elif calibration.error:
        out.append(f"its calibration artefact cannot be read: {calibration.error}")
    elif calibration.certificate is None:
        out.append(
            "its calibration artefact holds no certificate: the accept threshold promises no error rate"
        )
    else:
        if not vlm.accept_threshold_from_certificate:
            out.append("the certificate exists but accept_threshold_from_certificate is off")
        if vlm.disagreement_margin < 1.0:
            out.append(
                "the cheap tier's veto (disagreement_margin < 1) is not part of the certificate, which covers "
                "cheap score -> VLM confidence only"
            )
    return out


# --------------------------------------------------------------------------- calibration


def _number(value: Any) -> Any:
    """The certificate writes infinities as "inf"/"-inf": keep them as written, never as floats
    that JSON cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return value


def certificate_summary(certificate: dict[str, Any]) -> CertificateSummary:
    summary = {key: _number(certificate.get(key)) for key in CERTIFICATE_KEYS if key in certificate}
    tiers = certificate.get("three_tier")
    if tiers:
        summary["three_tier"] = {
            key: tiers[key]
            for key in (
                "accept_threshold",
                "review_threshold",
                "vlm_accept_threshold",
                "expected_cost_units",
                "rates",
            )
            if key in tiers
        }
    return CertificateSummary(
        feasible=bool(certificate.get("feasible", certificate.get("threshold") is not None)), **summary
    )


def calibration_section(path: str) -> CalibrationSection:
    from cascades.calibration import load_calibration

    try:
        calibrator = load_calibration(path)
    except ConfigError as exc:
        return CalibrationSection(path=str(path), error=exc.reason)
    artefact = calibrator.artifact
    return CalibrationSection(
        path=str(Path(path).expanduser()),
        artifact_id=calibrator.artifact_id,
        method=artefact.method,
        kind=artefact.kind,
        created_at=artefact.created_at,
        data_sha256=artefact.data_sha256,
        n_samples=artefact.n_samples,
        fitted_on_model=dict(artefact.model),
        fit_metrics=dict(artefact.fit_metrics),
        has_input_reference=artefact.input_reference is not None,
        certificate=certificate_summary(artefact.certificate) if artefact.certificate else None,
    )


def cheap_tier_limitations(
    facts: CheapTierFacts,
    calibration: CalibrationSection | None,
    thresholds: ThresholdPolicy,
    certified_in_force: bool,
    *,
    shift_guard_on: bool,
) -> list[str]:
    out = list(facts.problems)
    preprocess = facts.inputs.get("preprocess") or {}
    decoder = facts.inputs.get("decoder")
    if preprocess.get("size_hw"):
        height, width = preprocess["size_hw"]
        how = {"stretch": "stretched", "center_crop": "centre-cropped then resized"}.get(
            preprocess.get("resize", "letterbox"), "letterboxed"
        )
        out.append(
            f"every image is {how} to {height}x{width} pixels before the model sees it: detail finer than "
            "that resolution is lost"
        )
    elif preprocess.get("max_side"):
        out.append(
            f"the longer side is limited to {preprocess['max_side']} px (sides multiples of "
            f"{preprocess.get('multiple', 1)}): very small text or objects may be missed"
        )
    if facts.labels is not None:
        if decoder == "classifier":
            out.append(
                f"it answers only among its {facts.labels.count} labels: an image of anything else still "
                "gets one of them (with a confidence the thresholds must catch)"
            )
        elif decoder == "dbnet":
            out.append("it finds text regions only; it does not read the text")
        else:
            out.append(f"it detects only its {facts.labels.count} classes")
    if calibration is None:
        out.append(
            f"its confidence is uncalibrated: the thresholds (accept >= {thresholds.accept_threshold}) are "
            "not probabilities of being right and promise no error rate"
        )
        return out
    if calibration.error:
        out.append(f"its calibration artefact cannot be read: {calibration.error}")
        return out
    fitted_sha = calibration.fitted_on_model.get("sha256")
    if fitted_sha and facts.provenance.sha256 and fitted_sha != facts.provenance.sha256:
        out.append(
            f"the calibration was fitted on another model file (sha256 {fitted_sha[:16]}...), not this one: "
            "its confidences and certificate do not apply"
        )
    certificate = calibration.certificate
    if certificate is None:
        out.append("the calibration artefact holds no risk certificate: the thresholds promise no error rate")
        return out
    if not certificate.feasible:
        out.append(
            "the certificate is INFEASIBLE: no threshold kept the error low enough, so nothing is "
            "auto-accepted under it"
        )
    else:
        out.append(
            f"the certificate (error among auto-accepted <= {certificate.alpha} with probability >= "
            f"1 - {certificate.delta}) holds for inputs drawn like its {certificate.n} calibration items; it "
            "says nothing about inputs unlike them (distribution shift)"
            + ("" if shift_guard_on else ", and the shift guard that would flag those is off")
        )
    if not certified_in_force:
        out.append(
            "the thresholds in force are not the certified ones (thresholds_from_certificate is off, or the "
            "policy set overrides them), so the certificate does not describe this deployment's accepts"
        )
    return out


# --------------------------------------------------------------------------- eval reports


def _scalar_metrics(values: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        key: value
        for key, value in values.items()
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    }


def _newest_reports(reports_dir: Path) -> list[Path]:
    try:
        found = [path for path in reports_dir.glob("*/report.json") if path.is_file()]
    except OSError:
        return []
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)[:MAX_REPORTS_SCANNED]


def evaluation_section(
    reports_dir: Path, sha256: str, deployed_artifact_id: str | None = None
) -> EvaluationSection:
    """The newest ``visionroute eval`` report under ``reports_dir`` that evaluated this exact file
    (its calibration may differ from the deployed one: ``same_calibration`` says)."""
    for path in _newest_reports(reports_dir):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        models = report.get("models") if isinstance(report, dict) else None
        tier = next(
            (
                tier
                for tier, model in (models or {}).items()
                if isinstance(model, dict) and model.get("sha256") == sha256
            ),
            None,
        )
        if tier is None:
            continue
        metrics = report.get("metrics") or {}
        suite = next((name for name in SUITES.get(tier, ()) if name in metrics), None)
        robustness = report.get("robustness") or None
        used = (report.get("calibration") or {}).get("artifact_id")
        return EvaluationSection(
            calibration_artifact_id=used,
            same_calibration=None
            if deployed_artifact_id is None or used is None
            else used == deployed_artifact_id,
            status=f"from the newest eval report that names this file's sha256 (as its {tier} tier)",
            report=str(path),
            created_at=report.get("created_at"),
            dataset={k: v for k, v in (report.get("dataset") or {}).items() if k != "class_names"},
            suite=suite,
            slices={name: _scalar_metrics(values) for name, values in (metrics.get(suite) or {}).items()},
            certified_risk_check=(report.get("certified_risk_check") or None) if tier == "cheap" else None,
            robustness=[_robustness_row(row) for row in robustness["rows"]] if robustness else None,
            bound_breaks=robustness.get("bound_breaks") if robustness else None,
        )
    return EvaluationSection(
        status=f"no evaluation report under {reports_dir} names this file's sha256; run `visionroute eval` "
        "(with --model for your own images, --corruptions for robustness) to measure it"
    )


def _robustness_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {key: row.get(key) for key in ROBUSTNESS_KEYS}
    unguarded = row.get("no_guard") or {}
    out["accepted_error"] = unguarded.get("accepted_error")
    out["coverage"] = unguarded.get("coverage")
    return out
