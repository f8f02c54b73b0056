"""Procedural captioned scenes: one to three coloured shapes at named positions and sizes.

A :class:`Scene` is pure data; :func:`sample_scene` draws one from a seed, :func:`caption` writes it
as text ("a large red circle at the top left on a blue background"), :func:`parse_caption` reads
such text back, and :func:`render` draws it with numpy (supersampled, so edges are anti-aliased).
Everything is deterministic: the same seed gives the same scene, caption and pixels everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Well separated in RGB so that "nearest named colour" is unambiguous for a detector.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 45),
    "green": (40, 165, 60),
    "blue": (35, 85, 220),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# radius of the shape's circumscribing circle, as a fraction of the image side
# (a small star still has points an 8x VAE and a 64 px image can draw: 9 px from its centre)
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.18, "large": 0.23}
# 3 x 3 grid of named positions: name -> (x, y) centre as a fraction of the image side
_GRID = (0.26, 0.5, 0.74)
# scale of the random offset of a shape's centre from its named grid point (fraction of the side,
# up to +-0.02 x JITTER). Zero: a caption names one image exactly. With offsets of +-1.3 px the
# transformer's best guess at high noise is the average over offsets, a blurred shape, and it drew
# rounded blobs that read as circles (docs/micro.md). The offsets are still drawn (and scaled), so
# every one-shape seed keeps its caption.
JITTER = 0.0
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_GRID[0], _GRID[0]), "top": (_GRID[1], _GRID[0]), "top right": (_GRID[2], _GRID[0]),
    "left": (_GRID[0], _GRID[1]), "centre": (_GRID[1], _GRID[1]), "right": (_GRID[2], _GRID[1]),
    "bottom left": (_GRID[0], _GRID[2]), "bottom": (_GRID[1], _GRID[2]), "bottom right": (_GRID[2], _GRID[2]),
}
_PHRASE = {p: ("in the centre" if p == "centre" else f"at the {p}") for p in POSITIONS}
_PHRASE_TO_POS = {v: k for k, v in _PHRASE.items()}
WORDS = sorted({w for text in [*COLOURS, *SHAPES, *SIZES, *_PHRASE.values(),
                               "a an on and background"] for w in text.split()})


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    dx: float = 0.0  # jitter of the centre, fraction of the image side
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, ...]  # one colour, or two: top half then bottom half


def _overlap(a: Shape, b: Shape) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    d = ((ax + a.dx - bx - b.dx) ** 2 + (ay + a.dy - by - b.dy) ** 2) ** 0.5
    return d < SIZES[a.size] + SIZES[b.size] + 0.02


def sample_scene(seed: int, max_shapes: int = 3) -> Scene:
    """A random scene, deterministic in ``seed``: 1..max_shapes shapes of distinct colours at
    distinct, non-overlapping positions, on a plain or two-tone background of other colours."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.6, 0.3, 0.1][:max_shapes])
    n = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    names = list(COLOURS)
    while True:
        colours = rng.permutation(len(names))
        shapes: list[Shape] = []
        for pos in rng.permutation(len(POSITIONS))[: 3 * n]:
            if len(shapes) == n:
                break
            s = Shape(SHAPES[rng.integers(len(SHAPES))], names[colours[len(shapes)]], list(SIZES)[rng.integers(3)],
                      list(POSITIONS)[pos], JITTER * float(rng.uniform(-0.02, 0.02)),
                      JITTER * float(rng.uniform(-0.02, 0.02)))
            if not any(_overlap(s, o) for o in shapes):
                shapes.append(s)
        if len(shapes) == n:
            break
    rest = [names[i] for i in colours[n:]]
    background = (rest[0],) if rng.random() < 0.7 else (rest[0], rest[1])
    return Scene(tuple(shapes), background)


def caption(scene: Scene) -> str:
    """The scene as text: "a large red circle at the top left and a small blue star in the centre
    on a white background" (two-tone: "on a blue and white background", top colour first)."""
    parts = [f"a {s.size} {s.colour} {s.kind} {_PHRASE[s.position]}" for s in scene.shapes]
    bg = " and ".join(scene.background)
    return " and ".join(parts) + f" on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"


_SHAPE_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(sorted(_PHRASE_TO_POS, key=len, reverse=True))})"
)
_CAPTION_RE = re.compile(
    rf"^({_SHAPE_RE.pattern}(?: and {_SHAPE_RE.pattern})*) on an? ((?:{'|'.join(COLOURS)})(?: and (?:{'|'.join(COLOURS)}))?)"
    r" background$"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (jitter zero); ValueError if it is not in this grammar."""
    text = " ".join(text.strip().lower().split())
    m = _CAPTION_RE.match(text)
    if not m:
        raise ValueError(f"not a procedural shapes caption: {text!r}")
    shapes = tuple(Shape(k, c, s, _PHRASE_TO_POS[p]) for s, c, k, p in _SHAPE_RE.findall(m.group(1)))
    return Scene(shapes, tuple(m.group(m.lastindex).split(" and ")))


# ---------------------------------------------------------------------------------------------
# geometry


def polygon(kind: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    """Vertices (k, 2) of ``kind`` centred at (cx, cy) inside a circle of radius ``r`` (y down);
    None for a circle."""
    if kind == "circle":
        return None
    if kind == "square":
        h = r * 0.8
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    if kind == "triangle":
        # equilateral, pointing up, its bounding box centred on (cx, cy)
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        R = r * 1.1
        pts = np.stack([cx + R * np.cos(ang), cy + R * np.sin(ang)], 1)
        pts[:, 1] += cy - (pts[:, 1].min() + pts[:, 1].max()) / 2
        return pts
    if kind == "star":
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 1.15 * 0.45)
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        pts[:, 1] += cy - (pts[:, 1].min() + pts[:, 1].max()) / 2
        return pts
    raise ValueError(f"unknown shape {kind!r}")


def inside(kind: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask: which points (x, y) fall inside the shape (even-odd rule for polygons)."""
    pts = polygon(kind, cx, cy, r)
    if pts is None:
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    out = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        out ^= crosses & (x < xi)
    return out


def shape_mask(kind: str, cx: float, cy: float, r: float, px: int, ss: int = 1) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a px x px image by the shape, from ss x ss samples."""
    # evaluate only the pixels of the circumscribing box (with a margin): the rest are zero
    x0, y0 = max(0, int(cx - 1.3 * r) - 1), max(0, int(cy - 1.3 * r) - 1)
    x1, y1 = min(px, int(cx + 1.3 * r) + 2), min(px, int(cy + 1.3 * r) + 2)
    out = np.zeros((px, px), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    x, y = np.meshgrid(xs, ys)
    m = inside(kind, cx, cy, r, x, y).astype(np.float32)
    out[y0:y1, x0:x1] = m.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def shape_geometry(s: Shape, px: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius of ``s`` in pixels."""
    fx, fy = POSITIONS[s.position]
    return (fx + s.dx) * px, (fy + s.dy) * px, SIZES[s.size] * px


def render(scene: Scene, px: int = 64, ss: int = 4) -> np.ndarray:
    """The scene as an (px, px, 3) uint8 RGB image, anti-aliased with ss x ss supersampling."""
    img = np.empty((px, px, 3), dtype=np.float32)
    bg = [np.array(COLOURS[c], dtype=np.float32) for c in scene.background]
    img[:] = bg[0]
    if len(bg) == 2:
        img[px // 2:] = bg[1]
    for s in scene.shapes:
        cx, cy, r = shape_geometry(s, px)
        a = shape_mask(s.kind, cx, cy, r, px, ss)[..., None]
        img = img * (1 - a) + np.array(COLOURS[s.colour], dtype=np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def coverage(scene: Scene, px: int = 64, ss: int = 2) -> np.ndarray:
    """(px, px) float32 in [0, 1]: how much of each pixel the scene's shapes cover."""
    out = np.zeros((px, px), dtype=np.float32)
    for s in scene.shapes:
        out = np.maximum(out, shape_mask(s.kind, *shape_geometry(s, px), px, ss))
    return out


def dataset(seeds, px: int = 64, max_shapes: int = 3) -> tuple[np.ndarray, list[str]]:
    """Images (n, px, px, 3) uint8 and captions for the scenes of ``seeds``."""
    scenes = [sample_scene(int(s), max_shapes) for s in seeds]
    return np.stack([render(sc, px) for sc in scenes]), [caption(sc) for sc in scenes]
