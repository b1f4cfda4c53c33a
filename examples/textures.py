"""A second real task beyond the digits: texture patches of scikit-image's bundled photographs.

No labelled set of natural photos large enough to certify on ships inside a registry package
this project can install (the dataset packages download at run time; docs/second_task.md lists
what was checked). scikit-image, already in the ``evals`` and ``test`` extras, ships eight
photographs of homogeneous material under CC0 or public-domain terms. Cut into non-overlapping
32x32 grey patches they form a labelled set in the Brodatz protocol (one photograph per texture
class, its sub-images the samples): 8 classes x 256 patches = 2,048 items, labelled by the
photograph they come from.

    label    scikit-image loader              what it shows
    brick    skimage.data.brick()             a brick wall (CC0 Textures)
    grass    skimage.data.grass()             grass (CC0)
    pebbles  skimage.data.gravel()            gravel (CC0 Textures)
    moon     skimage.data.moon()              the lunar surface (public domain)
    stars    skimage.data.hubble_deep_field() the Hubble deep field (NASA, public domain)
    tissue   skimage.data.immunohistochemistry()  stained tissue (no known restrictions)
    retina   skimage.data.retina()            a fundus photograph (CC0)
    cells    skimage.data.cell()              a cell under a microscope (CC0)

Every photograph is converted to grey (colour would name three of the classes by itself) and
its central 512x512 region is cut into a 16x16 grid. The labels start with distinct letters, so
the VLM's answers differ at their first token (``examples.textures_vlm``).

The tiers, as for the digits (``cascades.digits``, ``evals.harness.digits_tier_data``):

- ``cheap``: filter energies (4 learned 5x5 filters, their mean absolute and log mean squared
  responses over the patch, its mean and deviation, a linear layer: 192 weights), trained here
  in torch and exported to ONNX (opset 17), run through the service's ``OnnxModel``. Its
  calibration is a temperature fitted on a fit share (``fit_cheap_calibration``; the harness and
  the benches fit their own on their fit share).
- ``strong``: the tiny LLaVA (``examples.textures_vlm``) trained here on the same training share
  to answer the service's classify prompt; its class probabilities come from its answer logits
  in-process (no vLLM server is needed for the figures).

The split is fixed by ``seed``: 40% trains the tiers, the rest (the pool) is what calibration,
certification and evaluation share among themselves. Trained artefacts are cached under
``$VISIONROUTE_HOME/cache/textures`` (``cache_dir()``), keyed by recipe version and seed. What
the evaluations read, ``tier_data`` (a ``TierData``) and ``router_task`` (``bench router``'s
loader), is in ``evals.textures``: the examples layer sits below evals. docs/second_task.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionroute import paths

log = logging.getLogger(__name__)

TASK = "textures"
# label -> scikit-image loader; the order is the class index
SOURCES: tuple[tuple[str, str], ...] = (
    ("brick", "brick"),
    ("grass", "grass"),
    ("pebbles", "gravel"),
    ("moon", "moon"),
    ("stars", "hubble_deep_field"),
    ("tissue", "immunohistochemistry"),
    ("retina", "retina"),
    ("cells", "cell"),
)
CLASS_NAMES = tuple(label for label, _ in SOURCES)
PATCH = 32  # pixels per side of one item
REGION = 512  # the central region of each photograph that is cut into patches
PER_CLASS = (REGION // PATCH) ** 2  # 256
SEED = 0
TRAIN_FRACTION = 0.4  # as the digits: the cheap tier must leave room for the strong one
CHEAP_VERSION = "textures-cheap-1"  # change with the recipe below: cached models are rebuilt
CHEAP_EPOCHS = 60
CHEAP_FILTERS = 4
EMBEDDING = "uniform LBP histograms of the 32x32 grey patch (8 neighbours on the square at radius 1 and 2), L2-normalised"


class MissingDataPackage(RuntimeError):
    """The package that ships the images is not installed."""


def cache_dir() -> Path:
    return paths.home() / "cache" / TASK


# --------------------------------------------------------------------------- the data


def _skimage_data():
    try:
        from skimage import data
    except ImportError as exc:
        raise MissingDataPackage(
            "the textures task reads its photographs from scikit-image (skimage.data), which is not "
            "installed: pip install 'visionroute[evals]' (or scikit-image>=0.22)"
        ) from exc
    return data


def _grey_region(image: np.ndarray) -> np.ndarray:
    """The central REGION x REGION of a photograph, grey, float32 in [0, 1]."""
    pixels = np.asarray(image)
    if pixels.ndim == 3:
        from skimage.color import rgb2gray

        pixels = rgb2gray(pixels[..., :3])  # floats in [0, 1]
    elif pixels.dtype == np.uint8:
        pixels = pixels / 255.0
    height, width = pixels.shape
    if height < REGION or width < REGION:
        raise ValueError(f"a source photograph of {height}x{width} is smaller than {REGION}x{REGION}")
    top, left = (height - REGION) // 2, (width - REGION) // 2
    return np.clip(pixels[top : top + REGION, left : left + REGION], 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Textures:
    images: np.ndarray  # (2048, 32, 32) float32 in [0, 1], grey
    labels: np.ndarray  # (2048,) int64 class index into CLASS_NAMES
    positions: np.ndarray  # (2048, 2) int64: the patch's (row, column) in its photograph's 16x16 grid


@functools.lru_cache(maxsize=1)
def load_textures() -> Textures:
    """Every patch, class by class, in grid order (row-major); read-only arrays, built once per
    process. Raises ``MissingDataPackage`` without scikit-image."""
    data = _skimage_data()
    grid = REGION // PATCH
    images, labels, positions = [], [], []
    for index, (_, loader) in enumerate(SOURCES):
        region = _grey_region(getattr(data, loader)())
        patches = region.reshape(grid, PATCH, grid, PATCH).transpose(0, 2, 1, 3).reshape(-1, PATCH, PATCH)
        images.append(patches)
        labels.append(np.full(len(patches), index, np.int64))
        positions.append(np.stack(np.divmod(np.arange(len(patches)), grid), axis=1))
    textures = Textures(
        np.ascontiguousarray(np.concatenate(images)),
        np.concatenate(labels),
        np.concatenate(positions).astype(np.int64),
    )
    for array in (textures.images, textures.labels, textures.positions):
        array.setflags(write=False)
    return textures


@dataclass(frozen=True)
class TexturesSplit:
    """As ``cascades.digits.DigitsSplit``: images (n, 1, 32, 32) float32 in [0, 1]."""

    images_train: np.ndarray
    labels_train: np.ndarray
    images_pool: np.ndarray
    labels_pool: np.ndarray
    pool_index: np.ndarray  # row of each pool item in load_textures()
    train_index: np.ndarray


def load_split(seed: int = SEED) -> TexturesSplit:
    textures = load_textures()
    images = textures.images[:, None]
    order = np.random.default_rng(seed).permutation(len(textures.labels))
    n_train = int(TRAIN_FRACTION * len(order))
    train, pool = order[:n_train], order[n_train:]
    return TexturesSplit(
        images[train], textures.labels[train], images[pool], textures.labels[pool], pool, train
    )


def rendered(images: np.ndarray) -> list[np.ndarray]:
    """Grey patches ((n, 32, 32) or (n, 1, 32, 32) in [0, 1]) as the RGB uint8 uploads a client
    sends (what the VLM is trained on and what the shift guard's statistics see)."""
    from examples.textures_vlm import grey_uploads

    return grey_uploads(np.asarray(images, np.float32).reshape(-1, PATCH, PATCH))


def _uniform_codes() -> np.ndarray:
    """8-bit LBP code -> its "uniform" bin: the number of set bits (0..8) when the circular
    pattern has at most two 0/1 transitions, else 9."""
    codes = np.arange(256)
    rotated = (codes >> 1) | ((codes & 1) << 7)
    transitions = np.array([bin(c ^ r).count("1") for c, r in zip(codes, rotated)])
    ones = np.array([bin(c).count("1") for c in codes])
    return np.where(transitions <= 2, ones, 9).astype(np.int64)


_UNIFORM = _uniform_codes()
LBP_RADII = (1, 2)


def embeddings(images: np.ndarray) -> np.ndarray:
    """A texture descriptor per patch for the router's reference index (``EMBEDDING``): the
    cheap tier's input pixels are no use to a nearest-neighbour search on textures (a shifted
    patch of the same wall shares no pixel positions), local binary patterns are (the nearest
    training patch has the same label for ~97% of the pool). The 8 neighbours sit on the square
    at each radius (no interpolation): vectorised numpy, ~80 us per upload where scikit-image's
    circular LBP at two radii took ~310 us."""
    pixels = np.round(np.asarray(images, np.float32).reshape(-1, PATCH, PATCH) * 255.0)
    blocks = []
    for r in LBP_RADII:
        centre = pixels[:, r : PATCH - r, r : PATCH - r]
        code = np.zeros(centre.shape, np.int64)
        around = ((-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r))  # circular order
        for bit, (dy, dx) in enumerate(around):
            neighbour = pixels[:, r + dy : PATCH - r + dy, r + dx : PATCH - r + dx]
            code |= (neighbour >= centre).astype(np.int64) << bit
        bins = _UNIFORM[code].reshape(len(pixels), -1)
        blocks.append(np.stack([np.bincount(row, minlength=10) for row in bins]))
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- the cheap tier


def _cheap_network():
    """Texture energy: 4 learned 5x5 filters (stride 2); per filter the mean absolute response
    and the log mean energy over the patch, with the patch's mean and standard deviation, into a
    linear layer (192 weights). A global-average-pooled ReLU CNN of the same size reached only
    ~0.6 on the pool: textures are told apart by how strongly filters respond, not where."""
    import torch
    from torch import nn

    class FilterEnergy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, CHEAP_FILTERS, 5, stride=2)
            self.linear = nn.Linear(2 * CHEAP_FILTERS + 2, len(CLASS_NAMES))

        def forward(self, x):
            response = self.conv(x - 0.5)
            features = [
                response.abs().mean((2, 3)),
                response.pow(2).mean((2, 3)).add(1e-6).log(),
                x.mean((2, 3)),
                x.std((2, 3)),
            ]
            return self.linear(torch.cat(features, 1))

    return FilterEnergy()


def train_cheap(split: TexturesSplit, *, seed: int = SEED, epochs: int = CHEAP_EPOCHS):
    """Adam on the training share, minibatches of 64; deterministic for a seed on CPU (one
    torch thread while it trains)."""
    import torch

    from cascades.classifier_training import fit_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = fit_classifier(
            _cheap_network(), split.images_train, split.labels_train, lr=1e-2, epochs=epochs, seed=seed
        )
    finally:
        torch.set_num_threads(threads)
    return model


def export_cheap(model, path: Path, *, seed: int) -> Path:
    """ONNX (opset 17, the TorchScript exporter, as the digits tiers) and its sidecar, written
    to a temporary name first so a concurrent reader never sees half a file."""
    from cascades.classifier_training import export_classifier_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}-") as tmp:
        staged = Path(tmp) / path.name
        export_classifier_onnx(model, staged, (1, 1, PATCH, PATCH))
        sidecar = {
            "name": "textures-cheap",
            "task": "classify",
            "class_names": list(CLASS_NAMES),
            "output": "logits",
            "input": f"(n, 1, {PATCH}, {PATCH}) grey in [0, 1]",
            "trained_on": f"scikit-image texture patches, seed={seed}, train_fraction={TRAIN_FRACTION}",
            "version": CHEAP_VERSION,
        }
        staged.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        os.replace(staged.with_suffix(".json"), path.with_suffix(".json"))
        os.replace(staged, path)
    return path


def prepare_cheap(out_dir: Path | None = None, *, seed: int = SEED, force: bool = False) -> Path:
    """Train and export the cheap tier unless this recipe's file for ``seed`` exists."""
    path = Path(out_dir or cache_dir()) / f"{CHEAP_VERSION}-seed{seed}.onnx"
    if force or not path.is_file():
        log.info("training the textures cheap tier (seed %d)", seed)
        export_cheap(train_cheap(load_split(seed), seed=seed), path, seed=seed)
    return path


def cheap_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The exported cheap tier through the service's ONNX runner: (n, 8) logits."""
    from cascades.onnx_runner import OnnxModel

    batch = np.asarray(images, np.float32).reshape(-1, 1, PATCH, PATCH)
    return OnnxModel(path).run(batch)[0]


def fit_cheap_calibration(data, fit_rows: np.ndarray, out_path: Path | None = None):
    """Temperature scaling of the cheap tier on ``fit_rows`` of a ``TierData`` (it never changes
    the answer); saved as the service's calibration artefact when ``out_path`` is given."""
    from cascades.calibration import fit_classifier

    calibrator = fit_classifier(
        "temperature",
        data.cheap_probabilities[fit_rows],
        data.labels[fit_rows],
        data.class_names,
        model=data.models.get("cheap"),
    )
    if out_path is not None:
        calibrator.save(out_path)
    return calibrator


# --------------------------------------------------------------------------- the VLM tier


def prepare_vlm(*, seed: int = SEED, cache: Path | None = None, progress=None):
    """The textures LLaVA of ``seed`` (``examples.textures_vlm``), trained on the training share
    unless ``cache`` (default ``cache_dir()``) holds it, with its label probabilities on every
    row of ``load_textures()``: an ``examples.textures_vlm.VlmTier``."""
    from examples import textures_vlm

    split = load_split(seed)
    return textures_vlm.ensure_vlm(
        Path(cache or cache_dir()) / f"{textures_vlm.BUILD_VERSION}-seed{seed}",
        split.images_train[:, 0],
        split.labels_train,
        CLASS_NAMES,
        score_images=load_textures().images,
        seed=seed,
        progress=progress,
    )


# --------------------------------------------------------------------------- timing, for the benches


def cheap_tier_us(path: Path, uploads: list[np.ndarray]) -> float:
    """Median microseconds of the cheap tier on one upload: the RGB upload to the grey (1, 1, 32,
    32) input, then the ONNX model (no ``OnnxStage`` model config exists for this task)."""
    import time

    from cascades.onnx_runner import OnnxModel

    model = OnnxModel(path)

    def one(upload: np.ndarray) -> None:
        grey = upload.astype(np.float32).mean(axis=2) / 255.0
        model.run(grey[None, None])

    one(uploads[0])  # warm
    times = []
    for upload in uploads:
        started = time.perf_counter()
        one(upload)
        times.append((time.perf_counter() - started) * 1e6)
    return float(np.median(times))


def embed_us(uploads: list[np.ndarray]) -> float:
    """Median microseconds of ``embeddings`` on one upload (grey conversion included)."""
    import time

    times = []
    for upload in uploads:
        started = time.perf_counter()
        embeddings(upload.astype(np.float32).mean(axis=2) / 255.0)
        times.append((time.perf_counter() - started) * 1e6)
    return float(np.median(times))
