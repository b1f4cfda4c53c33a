"""``VlmStage``: ask the VLM about one escalated ``Analysis`` and append the ``vlm`` step.

``run`` never raises for a backend fault: a VLM that is down, slow, overloaded or broken, and an
output that is not a valid answer, all end in a ``Step(stage="vlm", decision=REVIEW)`` whose
``reason`` and ``error`` say what happened. Only an accepted answer replaces ``analysis``'s answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from cascades.router_stage import VLM_ACCEPT_KEY
from cascades.vlm.client import OpenAiVlmClient, VlmBackend, VlmBackendError, VlmCompletion, VlmRequest
from cascades.vlm.confidence import span_confidence
from cascades.vlm.config import VlmConfig
from cascades.vlm.prompts import TASKS, InvalidAnswer, parse_answer, response_format
from policies.vlm_decision import (
    VlmOutcome,
    VlmPolicy,
    classify_disagreement,
    decide_after_vlm,
    text_disagreement,
    verify_disagreement,
)
from visionroute.records import Analysis, Decision, Detections, Step
from visionroute.redaction import failure_summary, scrubbed

log = logging.getLogger(__name__)

STAGE = "vlm"
RAW_OUTPUT_CHARS = 512  # how much of the model's raw output a step keeps, for reviewers


def image_data_url(image_rgb: np.ndarray, *, max_side: int, image_format: str = "jpeg") -> str:
    """The image as a ``data:`` URL, downscaled so its longer side is at most ``max_side``."""
    image = Image.fromarray(np.ascontiguousarray(image_rgb, dtype=np.uint8))
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=90)
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _verify_target(analysis: Analysis) -> int:
    """The row to verify: the cheap tier's most confident detection."""
    if analysis.detections is None or len(analysis.detections) == 0:
        raise InvalidAnswer("task 'verify' needs a detection from the cheap tier; there is none")
    return int(analysis.detections.confidence.argmax())


def _crop(image_rgb: np.ndarray, xyxy: np.ndarray, padding: float) -> np.ndarray:
    height, width = image_rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    left, top = int(max(0, np.floor(x0 - pad_x))), int(max(0, np.floor(y0 - pad_y)))
    right, bottom = int(min(width, np.ceil(x1 + pad_x))), int(min(height, np.ceil(y1 + pad_y)))
    if right - left < 1 or bottom - top < 1:
        return image_rgb
    return image_rgb[top:bottom, left:right]


class VlmStage:
    """One VLM tier. Thread-safe; one instance per process (e.g. per Ray Serve replica)."""

    def __init__(self, config: VlmConfig, backend: VlmBackend | None = None) -> None:
        self.config = config
        self.calibrator = None
        accept_threshold, version = config.accept_threshold, config.policy_version
        if config.calibration is not None:
            from cascades.vlm.calibration import certified_accept_threshold, load_vlm_calibrator

            self.calibrator = load_vlm_calibrator(config.calibration, task=config.task, labels=config.labels)
            if config.accept_threshold_from_certificate:
                accept_threshold = certified_accept_threshold(self.calibrator, config.calibration)
                version = f"{version}+{self.calibrator.artifact_id}"
        self.policy = VlmPolicy(version, accept_threshold, config.disagreement_margin)
        self.backend = backend if backend is not None else make_backend(config)
        self._executor: ThreadPoolExecutor | None = None

    async def __call__(self, analysis: Analysis) -> Analysis:
        """``run`` off the event loop, on this stage's own pool (sized by max_concurrency)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="vlm")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run, analysis)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def policy_for(self, analysis: Analysis) -> tuple[VlmPolicy, str | None]:
        """The policy this request is judged under, and where its accept threshold came from:
        a learned router's certified plan, when it handed one over (cascades/router_stage.py),
        replaces the configured threshold; None: the configured policy."""
        routed = analysis.metadata.get(VLM_ACCEPT_KEY)
        if routed is None:
            return self.policy, None
        version = f"{self.policy.version}+{routed['source']}"
        return VlmPolicy(version, float(routed["threshold"]), self.policy.disagreement_margin), routed[
            "source"
        ]

    def build_request(self, analysis: Analysis) -> tuple[VlmRequest, dict[str, Any]]:
        """The chat request for this analysis, and the context the answer is judged in."""
        config = self.config
        image, context = analysis.image_rgb, {}
        if config.task == "verify":
            row = _verify_target(analysis)
            detections = analysis.detections
            context = {
                "row": row,
                "label": detections.labels[row] or "object",
                "confidence": float(detections.confidence[row]),
                "xyxy": [round(float(v), 2) for v in detections.xyxy[row]],
            }
            image = _crop(analysis.image_rgb, detections.xyxy[row], config.crop_padding)
        content = [
            {
                "type": "image_url",
                "image_url": {
                    "url": image_data_url(
                        image, max_side=config.image_max_side, image_format=config.image_format
                    )
                },
            },
            {"type": "text", "text": TASKS[config.task].prompt(config, context)},
        ]
        request = VlmRequest(
            messages=[{"role": "user", "content": content}],
            response_format=response_format(config),
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
        return request, context

    def run(self, analysis: Analysis) -> Analysis:
        started = time.perf_counter()
        config = self.config
        where = (
            config.endpoint
            if config.in_process is None or config.backend == "openai"
            else config.in_process.model_path
        )
        details: dict[str, Any] = {"task": config.task, "backend": config.backend, "endpoint": where}
        if self.calibrator is not None:  # named even when no answer came back to calibrate
            details["calibration"] = self.calibrator.artifact_id
        completion: VlmCompletion | None = None
        context: dict[str, Any] = {}
        try:
            request, context = self.build_request(analysis)
            details.update({k: v for k, v in context.items() if k != "label"})
            completion = self.backend.complete(request)
            details.update(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                attempts=completion.attempts,
                finish_reason=completion.finish_reason,
                raw_output=(completion.content or "")[:RAW_OUTPUT_CHARS],
            )
            answer, span = parse_answer(config, completion.content)
            confidence = span_confidence(
                completion.content, completion.tokens, span, TASKS[config.task].confidence
            )
            confidence = self._calibrated(answer, confidence, details)
            disagreement = self._disagreement(analysis, context, answer)
            outcome = VlmOutcome(answer, confidence, disagreement)
        except VlmBackendError as exc:
            details.update(failure=exc.kind, attempts=exc.attempts, status_code=exc.status_code)
            outcome = VlmOutcome(None, None, error=f"{exc.kind}: {scrubbed(exc.reason)}")  # clients see it
        except InvalidAnswer as exc:
            if completion is not None and completion.finish_reason == "length":
                exc = InvalidAnswer(f"{exc} (output cut at max_tokens={config.max_tokens})")
            details.update(failure="invalid_output")
            outcome = VlmOutcome(None, None, invalid_reason=str(exc))
        except Exception as exc:  # a bug or an unforeseen backend behaviour must still end in review
            log.exception("VLM stage failed unexpectedly")
            details.update(failure="unexpected")
            outcome = VlmOutcome(None, None, error=f"unexpected: {failure_summary(exc)}")

        policy, threshold_source = self.policy_for(analysis)
        decision, reason = decide_after_vlm(outcome, policy)
        details.update(answer=outcome.answer, disagreement=outcome.disagreement)
        if threshold_source is not None:
            details["accept_threshold_source"] = threshold_source
        analysis.trace.append(
            Step(
                stage=STAGE,
                decision=decision,
                reason=reason,
                model=completion.model if completion is not None else config.model,
                model_version=config.model_version,
                policy_version=policy.version,
                score=outcome.confidence,
                threshold=policy.thresholds,
                cost_units=self._cost(completion),
                latency_ms=(time.perf_counter() - started) * 1000.0,
                error=outcome.error
                or (f"invalid_output: {outcome.invalid_reason}" if outcome.invalid_reason else None),
                details=details,
            )
        )
        if decision is Decision.ACCEPT:
            self._set_answer(analysis, context, outcome)
        return analysis

    def _calibrated(self, answer: str, raw: float | None, details: dict[str, Any]) -> float | None:
        """The confidence the accept threshold is compared with: ``raw`` mapped by the
        calibration artefact, if one is configured; both scores and the artefact go in the step."""
        if self.calibrator is None or raw is None:
            return raw
        from cascades.vlm.calibration import answer_names, calibrated_confidence

        names = answer_names(self.config.task, self.config.labels)
        answer_id = names.index(answer) if names is not None and answer in names else -1
        calibrated = calibrated_confidence(self.calibrator, raw, answer_id)
        details.update(raw_score=raw, calibrated_score=calibrated, calibration=self.calibrator.artifact_id)
        return calibrated

    def _cost(self, completion: VlmCompletion | None) -> float:
        if completion is None:
            return 0.0
        return (
            completion.prompt_tokens * self.config.cost_per_1k_prompt_tokens
            + completion.completion_tokens * self.config.cost_per_1k_completion_tokens
        ) / 1000.0

    def _disagreement(self, analysis: Analysis, context: dict[str, Any], answer: str) -> float | None:
        if self.config.task == "classify":
            return classify_disagreement(analysis.detections, answer)
        if self.config.task == "verify":
            return verify_disagreement(context["confidence"], answer)
        return text_disagreement(analysis.answer_text, answer)  # the text read so far, if any

    def _set_answer(self, analysis: Analysis, context: dict[str, Any], outcome: VlmOutcome) -> None:
        """Replace the answer with the accepted VLM answer (earlier answers stay in the trace)."""
        if self.config.task == "classify":
            cheap = analysis.detections
            names = (
                cheap.class_names
                if cheap is not None and outcome.answer in cheap.class_names
                else self.config.labels
            )
            analysis.detections = Detections(
                xyxy=np.array([[0, 0, analysis.width, analysis.height]], np.float32),
                confidence=np.array([outcome.confidence], np.float32),
                class_id=np.array([list(names).index(outcome.answer)]),
                class_names=tuple(names),
            )
        elif self.config.task == "verify":
            if outcome.answer == "no":  # the VLM rejected the detection it was asked about
                keep = np.arange(len(analysis.detections)) != context["row"]
                analysis.detections = analysis.detections[keep]
        else:
            analysis.answer_text = outcome.answer


def make_backend(config: VlmConfig) -> VlmBackend:
    """The backend ``config.backend`` names (the registry the YAML's ``backend`` key selects)."""
    if config.backend == "in_process":
        from cascades.vlm.engine import InProcessVllmBackend  # needs vllm (the vlm-server extra)

        return InProcessVllmBackend(config)
    return OpenAiVlmClient(config)
