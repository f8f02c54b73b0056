"""Prompt adherence measured from pixels, for the procedural shapes captions.

For each shape a caption names, the detector segments the image by nearest named colour, takes the
largest connected region of the named colour (too small: the colour is missing), then reads the
shape (best overlap with a template of each kind fitted to the region's bounding box), the position
(nearest named grid point to the box's centre) and the size (nearest named radius). Accuracy is
the fraction of named shapes whose attribute is right; a missing colour counts wrong for all four.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import shapes as S

ATTRIBUTES = ("colour", "shape", "position", "size")
_PALETTE = np.array(list(S.COLOURS.values()), dtype=np.float32)
_NAMES = list(S.COLOURS)


@dataclass
class Adherence:
    """Per-attribute counts of correct shapes over ``total`` named shapes."""

    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
    total: int = 0

    def add(self, other: Adherence) -> None:
        for k in ATTRIBUTES:
            self.correct[k] += other.correct[k]
        self.total += other.total

    def accuracy(self) -> dict[str, float]:
        """Fraction correct per attribute (0 when nothing was scored)."""
        return {k: (self.correct[k] / self.total if self.total else 0.0) for k in ATTRIBUTES}


def colour_labels(img: np.ndarray) -> np.ndarray:
    """(H, W) index into COLOURS of each pixel's nearest named colour."""
    x = np.asarray(img, dtype=np.float32)[..., :3]
    d = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (all False if empty)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    # propagate the smallest index through each region until nothing changes
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    if not mask.any():
        return mask.copy()
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[counts.argmax()]


@lru_cache(maxsize=8)
def _extent(kind: str) -> tuple[float, float]:
    """(width, height) of the kind's bounding box at radius 1."""
    pts = S.polygon(kind, 0.0, 0.0, 1.0)
    if pts is None:
        return 2.0, 2.0
    return float(np.ptp(pts[:, 0])), float(np.ptp(pts[:, 1]))


@lru_cache(maxsize=8)
def min_area(px: int) -> float:
    """Pixels a region needs to count as the named colour: a third of the smallest shape's area."""
    smallest = min(S.SIZES.values()) * px
    return min(float(S.shape_mask(k, px / 2, px / 2, smallest, px, 4).sum()) for k in S.SHAPES) / 3


def read_region(region: np.ndarray) -> tuple[str, str, str]:
    """(shape, position, size) read from a boolean region of an image."""
    px = region.shape[0]
    ys, xs = np.nonzero(region)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    best, best_iou, best_r = S.SHAPES[0], -1.0, 1.0
    for kind in S.SHAPES:
        ew, eh = _extent(kind)
        r = ((x1 - x0) / ew + (y1 - y0) / eh) / 2
        tmpl = S.shape_mask(kind, cx, cy, r, px, 2) >= 0.5
        iou = (tmpl & region).sum() / max(1, (tmpl | region).sum())
        if iou > best_iou:
            best, best_iou, best_r = kind, iou, r
    pos = min(S.POSITIONS, key=lambda p: (S.POSITIONS[p][0] - cx / px) ** 2 + (S.POSITIONS[p][1] - cy / px) ** 2)
    size = min(S.SIZES, key=lambda s: abs(np.log(S.SIZES[s] * px / best_r)))
    return best, pos, size


def score(img, text: str) -> Adherence:
    """Adherence of one image (H, W, 3 array or PIL image) to one procedural caption."""
    scene = S.parse_caption(text)
    arr = np.asarray(img)
    labels = colour_labels(arr)
    out = Adherence(total=len(scene.shapes))
    for s in scene.shapes:
        region = largest_component(labels == _NAMES.index(s.colour))
        if region.sum() < min_area(arr.shape[0]):
            continue
        kind, pos, size = read_region(region)
        out.correct["colour"] += 1
        out.correct["shape"] += kind == s.kind
        out.correct["position"] += pos == s.position
        out.correct["size"] += size == s.size
    return out


def score_many(images, texts) -> Adherence:
    """Summed adherence over pairs of images and captions."""
    total = Adherence()
    for img, text in zip(images, texts, strict=True):
        total.add(score(img, text))
    return total


def held_out_prompts(n: int = 48, seed: int = 1_000_000, max_shapes: int | None = None) -> list[str]:
    """Captions of scenes drawn from seeds the training script never uses (it draws below 10**6),
    with at most ``max_shapes`` shapes (default: as many as the shipped micro model learned)."""
    if max_shapes is None:
        from .model import MAX_SHAPES as max_shapes
    return [S.caption(S.sample_scene(seed + i, max_shapes)) for i in range(n)]


def prompt_adherence(images, prompts) -> dict[str, float] | None:
    """Accuracy per attribute, and their ``mean``, over the pairs whose prompt is a shapes caption;
    None when no prompt is one (adherence is then not defined)."""
    total = Adherence()
    for img, text in zip(images, prompts, strict=True):
        try:
            total.add(score(img, text))
        except ValueError:
            continue
    if not total.total:
        return None
    acc = total.accuracy()
    return {**{k: round(v, 4) for k, v in acc.items()}, "mean": round(sum(acc.values()) / len(acc), 4)}
