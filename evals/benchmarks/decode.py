"""``visionroute bench decode``: peak memory of one ingress replica under large images.

The case from issue 11: 8 clients at once, each sending a 131 KB PNG of 6320x6320 (40 million
pixels, under the 40 M pixel limit). Each variant runs in a fresh process (so each peak RSS
is its own) through the real service core (router/services: decode, trace, review queue,
budget ledger), with the cheap tier standing in for the remote tier deployment: it holds a
serialised copy of the image for 50 ms, as a Ray handle call does, and answers from the mean
colour. Printed side by side in one run:

- ``unbounded``: no decode budget and no reduction (what the ingress did before);
- ``budgeted``: the shipped defaults (``limits.decode``: pixels in flight per replica, large
  images reduced to the size the tier needs);
- ``budgeted-jpeg``: the same images as JPEG (decoded at 1/8 scale by DCT scaling).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "unbounded": ("PNG", {"pixels_in_flight": 10**12, "reduce_above_pixels": 0}),
    "budgeted": ("PNG", {}),
    "budgeted-jpeg": ("JPEG", {}),
}


def large_image(side: int, fmt: str) -> bytes:
    """A smooth gradient with a little texture: PNG compresses 6320x6320 to ~130 KB."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[..., 0] = ramp[None, :]
    rgb[..., 1] = ramp[:, None]
    rgb[..., 2] = 128
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


class StandInTier:
    """The remote tier as the ingress sees it: a serialised copy in flight, then an answer."""

    async def predict(self, image_rgb):
        import numpy as np

        from cascades.pipeline import TierResult
        from visionroute.records import Detections

        sent = pickle.dumps(image_rgb, protocol=5)  # what a handle call serialises
        await asyncio.sleep(0.05)
        del sent
        means = image_rgb.reshape(-1, 3).mean(axis=0)
        probabilities = np.exp(means / 64.0) / np.exp(means / 64.0).sum()
        detections = Detections.from_class_probabilities(
            probabilities.astype(np.float32),
            ["red", "green", "blue"],
            width=image_rgb.shape[1],
            height=image_rgb.shape[0],
            top_k=3,
        )
        return TierResult(detections, "stand-in", "stand-in", 50.0, 1.0)

    async def describe(self):
        return {"model": "stand-in"}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Start the peak (VmHWM) afresh, so start-up does not count (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM since the last reset (or since start: ru_maxrss where it cannot be reset)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, clients: int, side: int, image_path: Path) -> dict:
    """One variant in this process: ``clients`` concurrent analyses of the same large image
    (made by the parent, so making it is not part of this process's peak)."""
    from router.config import parse_app_config
    from router.services import ImageRequest, VisionRouteService
    from visionroute.errors import RouterError

    fmt, decode = VARIANTS[variant]
    image = image_path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_app_config(
            {
                "models_dir": tmp,
                "default_task": "classify",
                "cascades": {
                    "classify": {
                        "tier": {"model": "stand-in", "size_hw": 224},
                        "policy": {"version": "bench", "accept_threshold": 0.2, "escalate_threshold": 0.1},
                    }
                },
                "limits": {"decode": {**decode, "wait_s": 60}},
                "review": {"path": str(Path(tmp) / "review")},
                "retrieval": {"enabled": False},
            }
        )
        service = VisionRouteService.build(config, tiers={"classify": StandInTier()})
        idle_mb = current_rss_mb()  # the replica at rest, before the clients
        reset_peak_rss()

        async def one(index: int) -> tuple[float, str]:
            started = time.perf_counter()
            try:
                await service.analyze.analyze(ImageRequest(image, f"bench-{index}"), None)
                outcome = "ok"
            except RouterError as exc:
                outcome = type(exc).__name__
            return time.perf_counter() - started, outcome

        async def all_clients():
            return await asyncio.gather(*(one(i) for i in range(clients)))

        started = time.perf_counter()
        results = asyncio.run(all_clients())
        wall_s = time.perf_counter() - started
    latencies = [seconds for seconds, _ in results]
    return {
        "variant": variant,
        "format": fmt,
        "image_bytes": len(image),
        "pixels": side * side,
        "clients": clients,
        "ok": sum(outcome == "ok" for _, outcome in results),
        "refused": sorted({outcome for _, outcome in results if outcome != "ok"}),
        "idle_rss_mb": round(idle_mb),
        "peak_rss_mb": round(peak_rss_mb()),
        "p50_s": round(statistics.median(latencies), 2),
        "max_s": round(max(latencies), 2),
        "wall_s": round(wall_s, 2),
    }


def run(args) -> int:
    rows = []
    images = Path(tempfile.mkdtemp(prefix="vr-bench-decode-"))
    try:
        for variant in args.variants:
            fmt = VARIANTS[variant][0]
            image_path = images / f"{args.side}.{fmt.lower()}"
            if not image_path.exists():
                image_path.write_bytes(large_image(args.side, fmt))
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "evals.benchmarks.decode",
                    "--one",
                    variant,
                    "--clients",
                    str(args.clients),
                    "--side",
                    str(args.side),
                    "--image",
                    str(image_path),
                ],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            if completed.returncode != 0:
                print(completed.stderr, file=sys.stderr)
                return completed.returncode
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(images, ignore_errors=True)
    print(
        f"{args.clients} concurrent analyses of one {args.side}x{args.side} image per variant, "
        "each variant in a fresh process (idle = RSS before the clients; peak = VmHWM while they ran)"
    )
    print(
        f"{'variant':14s} {'format':6s} {'bytes':>9s} {'ok':>3s} {'peak RSS':>9s} {'idle':>6s} {'p50':>7s} {'max':>7s}"
    )
    for row in rows:
        print(
            f"{row['variant']:14s} {row['format']:6s} {row['image_bytes']:9d} {row['ok']:3d} "
            f"{row['peak_rss_mb']:6d} MB {row['idle_rss_mb']:3d} MB {row['p50_s']:6.2f}s {row['max_s']:6.2f}s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--side", type=int, default=6320, help="image width = height in pixels")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the figures as JSON here")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", choices=list(VARIANTS), required=True)
    parser.add_argument("--image", type=Path, required=True)
    register_arguments(parser)
    options = parser.parse_args()
    print(json.dumps(run_variant(options.one, options.clients, options.side, options.image)))
