"""Procedural captioned shapes, and a GenEval-style judge of prompt adherence that needs no detector.

A scene is a few flat-coloured circles, squares and triangles on a white background; its caption comes
from a small closed grammar that `parse_caption` inverts into a `PromptSpec`. `analyze` recovers the
objects from pixels (nearest palette colour, connected components, best-matching ideal silhouette)
and `score` checks a `PromptSpec` against them with GenEval's five categories. Everything is relative
to the image side, so rendering and analysis work at any `size_px` in [32, 128]. Caption strings are
split by a stable hash: `sample_example` never emits one that `evaluation_prompts` may ask for.
This module depends on numpy and Pillow only.
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from socarrat.errors import UserError

SHAPES = ("circle", "square", "triangle")
# The six non-grey corners of the RGB cube: every pair is >= 255 apart, and so is the white
# background, the farthest any six colours and a background can be from each other. Orange and
# purple read more naturally but would sit ~130 from red and blue, too close for noisy samples.
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
CATEGORIES = ("single_object", "colour_attribution", "position", "two_objects", "counting")

# Bounding-box side as a fraction of the image side. Three large objects with the gap between them
# must still fit (see `_place`); small ones are ~8 px at 32 px, where a triangle is still a triangle.
DIAMETER = {"small": 0.25, "large": 0.38}
GAP = 0.08  # between bounding boxes: >= 2.5 px at 32 px, so components never merge
BORDER = 0.02
# How clearly a sampled scene satisfies its relation, and how clearly a judged image must: the
# slack covers centroids (which the judge sees) sitting d/6 below a triangle's box centre.
LAYOUT_MARGIN = 0.2
JUDGE_MARGIN = 0.1
MIN_AREA = 0.01  # fraction of the image below which a component is a speck
MIN_IOU = 0.6  # below this overlap with its best-matching ideal silhouette a blob is no shape
MAX_COLOUR_DIST = 150.0  # RGB distance beyond which a pixel matches no palette colour

NUMBERS = {2: "two", 3: "three"}
ABSOLUTE = {"left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
            "top": ("at the top",), "bottom": ("at the bottom",),
            "center": ("in the center", "in the middle")}
RELATIVE = {"above": ("above", "over"), "below": ("below", "under"),
            "left of": ("left of", "to the left of"), "right of": ("right of", "to the right of")}
CONNECTORS = ("and", "with")
PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
SUFFIXES = ("", ", white background")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; (cx, cy) is its bounding-box centre in [0, 1], y pointing down."""
    shape: str
    colour: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    """What `render` draws: objects whose bounding boxes are at least GAP apart."""
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class ObjectSpec:
    """An object as a caption names it; None means the caption leaves that attribute free."""
    shape: str
    colour: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for. `relation` is a key of ABSOLUTE (one object) or RELATIVE (two,
    the first relative to the second); `count` is set for "counting" only."""
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    count: int | None = None


@dataclass(frozen=True)
class DetectedObject:
    """An object found in pixels: (cx, cy) is its centroid in [0, 1]; shape is None when the blob
    resembles none of SHAPES, size compares its bounding box with the two DIAMETERs."""
    shape: str | None
    colour: str
    size: str
    area_px: int
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in px, end-exclusive


@dataclass(frozen=True)
class Score:
    """A verdict on one image and prompt; `reason` says what was asked and what was seen."""
    category: str
    passed: bool
    reason: str


# --- sampling --------------------------------------------------------------------------------

def _picker(rng: np.random.Generator) -> Callable[[tuple], object]:
    return lambda options: options[rng.integers(len(options))]


def _sample_spec(rng: np.random.Generator, category: str) -> PromptSpec:
    pick = _picker(rng)

    def obj(shape: str | None = None, coloured: bool = True) -> ObjectSpec:
        return ObjectSpec(shape or pick(SHAPES), pick(COLOURS) if coloured else None,
                          pick(SIZES) if rng.random() < 0.5 else None)

    if category == "single_object":
        return PromptSpec(category, (obj(),))
    if category == "counting":
        return PromptSpec(category, (obj(coloured=rng.random() < 0.7),), count=pick(tuple(NUMBERS)))
    if category == "two_objects":
        first, second = rng.permutation(SHAPES)[:2]
        return PromptSpec(category, (obj(str(first), False), obj(str(second), False)))
    if category == "position" and rng.random() < 0.4:
        return PromptSpec(category, (obj(),), pick(tuple(ABSOLUTE)))
    a, b = obj(), obj()
    # The two objects must be told apart: by colour for colour_attribution, else by shape or colour.
    while b.colour == a.colour and (category == "colour_attribution" or b.shape == a.shape):
        b = obj()
    return PromptSpec(category, (a, b), pick(tuple(RELATIVE)) if category == "position" else None)


def _phrase(obj: ObjectSpec, article: str) -> str:
    return " ".join(w for w in (article, obj.size, obj.colour, obj.shape) if w)


def _caption(spec: PromptSpec, pick: Callable[[tuple], str] = lambda options: options[0]) -> str:
    """A caption for `spec`, `pick` choosing among phrasings; by default the plainest one."""
    article = pick(("a", "one"))
    phrases = [_phrase(o, article) for o in spec.objects]
    if spec.count:
        body = f"{NUMBERS[spec.count]} {_phrase(spec.objects[0], '')}s"
    elif spec.relation in ABSOLUTE:
        body = f"{phrases[0]} {pick(ABSOLUTE[spec.relation])}"
    elif spec.relation:
        body = f"{phrases[0]} {pick(RELATIVE[spec.relation])} {phrases[1]}"
    else:
        body = f" {pick(CONNECTORS)} ".join(phrases)
    return pick(PREFIXES) + body + pick(SUFFIXES)


def _holds(relation: str, a: np.ndarray, b: np.ndarray | None, margin: float) -> np.ndarray:
    """Whether `relation` holds with `margin` to spare; a, b: (..., 2) centres (x, y) in [0, 1].

    "center" means inside the middle [0.25, 0.75] square, keeping `margin` clear of its edge.
    """
    m = margin
    if relation in RELATIVE:
        dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
        return {"above": dy > m, "below": -dy > m, "left of": dx > m, "right of": -dx > m}[relation]
    x, y = a[..., 0], a[..., 1]
    return {"left": x < 0.5 - m, "right": x > 0.5 + m, "top": y < 0.5 - m, "bottom": y > 0.5 + m,
            "center": np.abs(a - 0.5).max(-1) < 0.25 - m}[relation]


def _place(diameters: list[float], relation: str | None, rng: np.random.Generator) -> np.ndarray:
    """Centres (k, 2) that keep boxes inside the image, GAP apart, and `relation` clearly true."""
    # Vectorised rejection: three large boxes fit ~0.1% of uniform draws, so a batch of 4096 holds
    # a few valid layouts and a second batch is rarely needed.
    d = np.array(diameters)
    low = d / 2 + BORDER
    while True:
        c = low[None, :, None] + rng.random((4096, len(d), 2)) * (1 - 2 * low)[None, :, None]
        ok = np.ones(len(c), bool)
        for i in range(len(d)):
            for j in range(i + 1, len(d)):
                ok &= (np.abs(c[:, i] - c[:, j]) >= (d[i] + d[j]) / 2 + GAP).any(-1)
        if relation:
            ok &= _holds(relation, c[:, 0], c[:, -1], LAYOUT_MARGIN)
        if ok.any():
            return c[ok.argmax()]


def _scene(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    specs = spec.objects * (spec.count or 1)
    pick = _picker(rng)
    drawn = [(o.shape, o.colour or pick(COLOURS), o.size or pick(SIZES)) for o in specs]
    centres = _place([DIAMETER[size] for _, _, size in drawn], spec.relation, rng)
    return Scene(tuple(ShapeObject(*obj, float(cx), float(cy)) for obj, (cx, cy) in zip(drawn, centres)))


def is_heldout(caption: str) -> bool:
    """Whether this exact caption string is reserved for evaluation (1 in 8, by a stable hash)."""
    return hashlib.sha1(caption.encode()).digest()[0] % 8 == 0


def sample_example(rng: np.random.Generator) -> tuple[Scene, str, PromptSpec]:
    """A training example: a scene, its caption (never a held-out one) and what the caption asks."""
    pick = _picker(rng)
    while True:
        spec = _sample_spec(rng, pick(CATEGORIES))
        caption = _caption(spec, pick)
        if not is_heldout(caption):
            return _scene(spec, rng), caption, spec


def dataset(seed: int, n: int, size_px: int = 32) -> Iterator[tuple[np.ndarray, str]]:
    """n (image (H, W, 3) uint8, caption) pairs, identical for identical arguments."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene, caption, _ = sample_example(rng)
        yield render(scene, size_px), caption


def evaluation_prompts(n: int = 300, seed: int = 0) -> list[tuple[str, PromptSpec]]:
    """n distinct held-out captions with what they ask, as balanced over CATEGORIES as n allows.

    The grammar holds 864 single_object captions (103 held out), 1008 counting (137), 1728
    two_objects (196), 77760 colour_attribution (9776) and 359424 position (45173): n may reach 515.
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for i, category in enumerate(CATEGORIES):
        wanted, found, stale = n // len(CATEGORIES) + (i < n % len(CATEGORIES)), {}, 0
        # The rarest caption comes up about once in 1200 draws of its category, so 50000 draws
        # without a new one mean the category's held-out captions are exhausted.
        while len(found) < wanted and stale < 50_000:
            spec = _sample_spec(rng, category)
            caption = _caption(spec, _picker(rng))
            stale += 1
            if is_heldout(caption) and caption not in found:
                found[caption], stale = spec, 0
        if len(found) < wanted:
            raise UserError(f"n={n} asks for {wanted} {category} prompts but only {len(found)} distinct "
                            f"held-out ones exist; ask for n <= {len(CATEGORIES) * len(found)}")
        prompts += found.items()
    return prompts


# --- captions --------------------------------------------------------------------------------

def _alternatives(options) -> str:
    return "|".join(sorted(options, key=len, reverse=True))


_ATTRS = rf"(?:({_alternatives(SIZES)}) )?(?:({_alternatives(COLOURS)}) )?({_alternatives(SHAPES)})"
_PHRASE = rf"(?:a|one) {_ATTRS}"
_PHRASE_TO = {p: key for table in (ABSOLUTE, RELATIVE) for key, ps in table.items() for p in ps}
_PATTERNS = {
    "counting": rf"({_alternatives(NUMBERS.values())}) {_ATTRS}s",
    "relative": rf"{_PHRASE} ({_alternatives(sum(RELATIVE.values(), ()))}) {_PHRASE}",
    "absolute": rf"{_PHRASE} ({_alternatives(sum(ABSOLUTE.values(), ()))})",
    "pair": rf"{_PHRASE} (?:{_alternatives(CONNECTORS)}) {_PHRASE}",
    "single": _PHRASE,
}


def parse_caption(text: str) -> PromptSpec:
    """The PromptSpec a caption of this module's grammar asks for; UserError if it is not one."""
    body = " ".join(text.lower().split()).rstrip(".")
    body = next((body[len(p):] for p in PREFIXES if p and body.startswith(p)), body)
    body = next((body[:-len(s)] for s in SUFFIXES if s and body.endswith(s)), body)
    for form, pattern in _PATTERNS.items():
        m = re.fullmatch(pattern, body)
        if m:
            break
    else:
        raise UserError(f"caption {text!r} is not in the shapes grammar, e.g. 'a red circle', "
                        f"'two blue squares', 'a small green triangle left of a yellow circle'")
    g = m.groups()

    def spec(i: int) -> ObjectSpec:  # an object phrase's groups are size, colour, shape
        return ObjectSpec(g[i + 2], g[i + 1], g[i])

    if form == "counting":
        count = {word: k for k, word in NUMBERS.items()}[g[0]]
        return PromptSpec("counting", (spec(1),), count=count)
    if form == "relative":
        return PromptSpec("position", (spec(0), spec(4)), _PHRASE_TO[g[3]])
    if form == "absolute":
        return PromptSpec("position", (spec(0),), _PHRASE_TO[g[3]])
    if form == "single":
        return PromptSpec("single_object", (spec(0),))
    objects = (spec(0), spec(3))
    if (objects[0].colour is None) != (objects[1].colour is None):
        raise UserError(f"caption {text!r} colours one object but not the other; colour both or neither")
    return PromptSpec("two_objects" if objects[0].colour is None else "colour_attribution", objects)


# --- pixels ----------------------------------------------------------------------------------

def render(scene: Scene, size_px: int = 64) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image, H = W = size_px, sampled at pixel centres."""
    if not 32 <= size_px <= 128:
        raise UserError(f"size_px={size_px}: shapes are rendered and analysed at 32..128 px")
    image = np.full((size_px, size_px, 3), BACKGROUND, np.uint8)
    v, u = (np.mgrid[:size_px, :size_px] + 0.5) / size_px
    for o in scene.objects:
        r = DIAMETER[o.size] / 2
        dx, dy = np.abs(u - o.cx), v - o.cy
        mask = {"circle": dx**2 + dy**2 <= r**2, "square": (dx <= r) & (np.abs(dy) <= r),
                "triangle": (np.abs(dy) <= r) & (dx <= (dy + r) / 2)}[o.shape]  # apex up
        image[mask] = PALETTE[o.colour]
    return image


def _labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) index into COLOURS plus one, 0 for background or no colour, isolated pixels removed."""
    colours = np.array([BACKGROUND, *PALETTE.values()], float)
    dist = np.linalg.norm(rgb[..., None, :] - colours, axis=-1)
    labels = np.where(dist.min(-1) <= MAX_COLOUR_DIST, dist.argmin(-1), 0)
    # Noise in generated images: a pixel sharing its label with at most one 3x3 neighbour takes the
    # neighbourhood's majority. Unlike a full mode filter this keeps square corners and apexes.
    onehot = np.pad(np.eye(len(colours), dtype=int)[labels], ((1, 1), (1, 1), (0, 0)))
    h, w = labels.shape
    votes = sum(onehot[i:i + h, j:j + w] for i in range(3) for j in range(3))
    own = np.take_along_axis(votes, labels[..., None], -1)[..., 0]
    return np.where(own <= 2, votes.argmax(-1), labels)


def _components(labels: np.ndarray) -> np.ndarray:
    """(H, W) id per 4-connected region of equal nonzero label: the smallest flat index in it."""
    ids = np.arange(labels.size).reshape(labels.shape)
    down = (slice(1, None),), (slice(None, -1),)
    right = (slice(None), slice(1, None)), (slice(None), slice(None, -1))
    while True:
        low = ids.copy()
        for a, b in (down, right):
            joined = (labels[a] == labels[b]) & (labels[a] > 0)
            low[a] = np.where(joined, np.minimum(low[a], ids[b]), low[a])
            low[b] = np.where(joined, np.minimum(low[b], ids[a]), low[b])
        low = low.ravel()[low]  # pointer jumping: converges in a few passes, not one per pixel
        if np.array_equal(low, ids):
            return ids
        ids = low


def _shape(mask: np.ndarray) -> str | None:
    """The shape whose ideal silhouette, with the blob's area and centroid, overlaps the blob most.

    Thresholding the fill ratio of the bounding box (triangle 0.5, circle 0.785, square 1) fails at
    8 px, where a rasterised circle fills 0.67..0.92 and one stray pixel moves the box; area and
    centroid are robust to both. A blob far from every ideal (a 6:1 bar, a ring) gets None; a 2:1 bar,
    a 2:1 ellipse or a diamond still overlaps the circle just above MIN_IOU (`benchmarks/judge.py`).
    """
    ys, xs = np.nonzero(mask)
    area, (y, x) = len(xs), np.mgrid[:mask.shape[0], :mask.shape[1]]
    dx, dy = x - xs.mean(), y - ys.mean()
    half, side = np.sqrt(area) / 2, np.sqrt(2 * area)  # square; apex-up triangle, base = height
    ideal = {"circle": dx**2 + dy**2 <= area / np.pi, "square": (np.abs(dx) <= half) & (np.abs(dy) <= half),
             "triangle": (dy <= side / 3) & (np.abs(dx) <= (dy + 2 * side / 3) / 2)}  # centroid 2/3 down
    iou = {shape: (m & mask).sum() / (m | mask).sum() for shape, m in ideal.items()}
    best = max(iou, key=iou.get)
    return best if iou[best] >= MIN_IOU else None


def analyze(image: np.ndarray | Image.Image) -> list[DetectedObject]:
    """The coloured objects in an (H, W, 3) uint8 RGB image (or a PIL image), largest first."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        # A float image in [0, 1] would be far from every palette colour: no objects, every prompt failed.
        raise UserError(f"image is {array.dtype} of shape {array.shape}; analyze takes (H, W, 3) uint8 RGB")
    rgb = array.astype(float)
    h, w, _ = rgb.shape
    labels = _labels(rgb)
    ids = _components(labels)
    roots, counts = np.unique(ids[labels > 0], return_counts=True)
    found = []
    for root in roots[counts >= MIN_AREA * h * w]:
        ys, xs = np.nonzero(ids == root)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        shape = _shape(np.pad(ids[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == root, 2))
        size = "small" if max(bw, bh) / max(h, w) < sum(DIAMETER.values()) / 2 else "large"
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        found.append(DetectedObject(shape, COLOURS[labels.flat[root] - 1], size, len(xs),
                                    float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h, bbox))
    return sorted(found, key=lambda o: -o.area_px)


# --- judging ---------------------------------------------------------------------------------

def _matches(obj: DetectedObject, spec: ObjectSpec) -> bool:
    return all(want in (None, got) for want, got in
               ((spec.shape, obj.shape), (spec.colour, obj.colour), (spec.size, obj.size)))


def score(image: np.ndarray | Image.Image, prompt: str | PromptSpec) -> Score:
    """Whether the image does what the prompt asks, judged as GenEval does.

    Extra objects are allowed except in counting, where exactly `count` objects must match (other
    objects are ignored). Two named objects must be two different detections; for a relation, any
    such pair satisfying it passes.
    """
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    found = analyze(image)
    candidates = [[o for o in found if _matches(o, s)] for s in spec.objects]
    if spec.count:
        passed = len(candidates[0]) == spec.count
    else:
        # One named object: itself as both a and b; two: pairs of distinct detections.
        pairs = [(a, b) for a in candidates[0] for b in candidates[-1] if len(candidates) == 1 or a is not b]
        passed = any(spec.relation is None or
                     _holds(spec.relation, np.array([a.cx, a.cy]), np.array([b.cx, b.cy]), JUDGE_MARGIN)
                     for a, b in pairs)
    seen = ", ".join(_phrase(ObjectSpec(o.shape or "shapeless blob", o.colour, o.size), "a") for o in found)
    return Score(spec.category, bool(passed), f"asked for {_caption(spec)}; saw {seen or 'nothing'}")


def score_many(images: Iterable[np.ndarray | Image.Image],
               prompts: Iterable[str | PromptSpec]) -> dict[str, float]:
    """Accuracy per category present, and "overall": their unweighted mean, as GenEval reports."""
    results: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts, strict=True):
        s = score(image, prompt)
        results.setdefault(s.category, []).append(s.passed)
    accuracy = {c: float(np.mean(r)) for c, r in results.items()}
    return {**accuracy, "overall": overall(accuracy)}


def overall(per_category: dict[str, float]) -> float:
    """GenEval's overall score: the unweighted mean of the categories' (or of their differences)."""
    return float(np.mean(list(per_category.values())))
