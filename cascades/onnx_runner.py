"""Run any ONNX file with ONNX Runtime: provider choice, batching, metadata, checksum."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from visionroute.errors import ConfigError

log = logging.getLogger(__name__)

# Preferred order: the first one this onnxruntime build offers wins.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def parse_metadata_value(text: str):
    """A metadata_props string -> its value: JSON, else a Python literal, else the string.

    Ultralytics writes Python literals (``names="{0: 'person'}"``, ``imgsz='[320, 320]'``);
    they are read with ``ast.literal_eval``, which evaluates literals only, never code.
    """
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        pass
    if text.lstrip()[:1] in ("[", "{", "(") or text in ("True", "False", "None"):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """CUDA when this onnxruntime build has it, CPU otherwise; unknown names are an error."""
    available = ort.get_available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            raise ConfigError(
                f"execution providers {unknown} are not available; this onnxruntime offers {available}",
                field="providers",
            )
        return list(requested)
    return [p for p in DEFAULT_PROVIDERS if p in available] or available[:1]


class OnnxModel:
    """One ONNX Runtime session over a model file, safe to call from several threads.

    ``file_metadata`` is the model's own metadata_props, values decoded (JSON or Python
    literals); ``metadata`` is that merged with an optional sidecar ``<model>.json`` written by
    ``visionroute models prepare`` (the sidecar wins).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        max_batch_size: int = 32,
        thread_spinning: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"ONNX model file {str(self.path)!r} does not exist", field="model_path")
        options = ort.SessionOptions()
        # The memory pattern plans one block per input shape; with a dynamic batch every new
        # batch size adds one to the CPU arena, which grew a serving replica's RSS by a quarter
        # after warm-up (docs/soak.md). Without it, RSS stays flat once each size has run.
        options.enable_mem_pattern = False
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not thread_spinning:
            # ORT's worker threads busy-wait between inferences by default; sleeping instead
            # frees those cores for other work on a shared machine, at some wake-up latency.
            # Off by default: on the 2-core build machine beside other processes (load 6-9),
            # 2 spinning threads took 63-65 ms of CPU per efficientnet_lite0 inference against
            # 19-24 ms sleeping, at a wall p50 of 144-267 against 27-43 ms; at load 2-3, 38 vs
            # 20 ms CPU and 22 vs 16 ms wall (1 thread has no worker to spin: the same either
            # way). python -m evals.benchmarks.ort_threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.providers = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(
                f"cannot load ONNX model {str(self.path)!r}: {exc}", field="model_path"
            ) from exc
        self.sha256 = file_sha256(self.path)
        self.input = self.session.get_inputs()[0]
        self.outputs = self.session.get_outputs()
        self.output_names = [o.name for o in self.outputs]
        # A file exported with a fixed batch (Ultralytics' default is 1) runs in chunks of
        # exactly that size, the last one padded.
        self.static_batch = self.input.shape[0] if self._is_fixed(self.input.shape[:1]) else None
        self.max_batch_size = self.static_batch or max_batch_size
        self.file_metadata = {
            key: parse_metadata_value(value)
            for key, value in self.session.get_modelmeta().custom_metadata_map.items()
        }
        self.metadata = self._read_metadata()
        log.info("loaded %s (sha256 %s) on %s", self.path.name, self.sha256[:12], self.providers)

    @staticmethod
    def _is_fixed(dims) -> bool:
        return bool(dims) and all(isinstance(d, int) and d > 0 for d in dims)

    def _read_metadata(self) -> dict:
        metadata = dict(self.file_metadata)
        sidecar = self.path.with_suffix(".json")
        if sidecar.is_file():
            metadata.update(json.loads(sidecar.read_text()))
        return metadata

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """The fixed (height, width) of the input, or None when dynamic."""
        shape = self.input.shape
        if len(shape) == 4 and self._is_fixed(shape[2:]):
            return int(shape[2]), int(shape[3])
        return None

    @property
    def input_channels(self) -> int | None:
        """The fixed channel count of an NCHW input (1: a grayscale model), or None."""
        shape = self.input.shape
        if len(shape) == 4 and self._is_fixed(shape[1:2]):
            return int(shape[1])
        return None

    @property
    def output_shapes(self) -> list[list[int | str | None]]:
        """Each output's shape as the file declares it (ints where fixed, names where not)."""
        return [list(o.shape) for o in self.outputs]

    @property
    def version(self) -> str:
        version = self.metadata.get("version")
        if version and "ultralytics" in str(self.file_metadata.get("author", "")).lower():
            return f"ultralytics=={version}"  # the exporter's version, not the weights'
        return str(version or f"sha256:{self.sha256[:16]}")

    def warm_up(self, max_batch_size: int) -> None:
        """Run zeros at every batch size from 1 to ``max_batch_size``, smallest first, so the
        CPU arena reaches the size serving needs before the first request (a new, larger batch
        later grows it). Models with a dynamic image size are left alone (no shape to run)."""
        hw, channels = self.input_hw, self.input_channels
        if hw is None or channels is None:
            return
        try:
            for rows in range(1, min(max_batch_size, self.max_batch_size) + 1):
                self.run(np.zeros((rows, channels, *hw), np.float32))
        except Exception as exc:  # noqa: BLE001 - an optimisation: a model with another input type still serves
            log.warning("warm-up of %s skipped: %s", self.path.name, exc)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run a (n, c, h, w) batch, in chunks of ``max_batch_size``; returns every output."""
        if batch.ndim != 4:
            raise ValueError(f"expected a (n, c, h, w) batch, got shape {batch.shape}")
        chunks = []
        for start in range(0, len(batch), self.max_batch_size):
            part = np.ascontiguousarray(batch[start : start + self.max_batch_size], np.float32)
            rows = len(part)
            if self.static_batch and rows < self.static_batch:
                padding = np.zeros((self.static_batch - rows, *part.shape[1:]), np.float32)
                part = np.concatenate([part, padding])
            chunks.append(
                [out[:rows] for out in self.session.run(self.output_names, {self.input.name: part})]
            )
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.output_names))]
