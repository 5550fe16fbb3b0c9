"""Real evaluation data, read from what tools/setup_material.sh installs. One place for every data set the
reference models are trained, calibrated and judged on."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


class MaterialMissing(RuntimeError):
    """Raised when real material is not installed; the message says how to install it."""


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' (60k) or 'test' (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise MaterialMissing(f"{images_path} is missing: run tools/setup_material.sh")
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def fashion_normalize(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], normalised the way every Fashion-MNIST model here expects."""
    x = images_u8.astype(np.float32) / 255.0
    return ((x - FASHION_MEAN) / FASHION_STD)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation sets for the benchmark harness (tools/bench/run.py). Every split is fixed by a seed, and the
# calibration split never shares a sample with the evaluation split.

import functools  # noqa: E402  (appended section)

def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10k Fashion-MNIST test images, normalised (float32 [10000, 1, 28, 28]), and their labels (int64)."""
    images, labels = fashion_mnist("test")
    return fashion_normalize(images), labels


def fashion_calibration(n: int = 256, seed: int = 0) -> np.ndarray:
    """n normalised Fashion-MNIST *training* images (float32 [n, 1, 28, 28]), a fixed random choice: calibration
    data that never overlaps the test set."""
    images, _ = fashion_mnist("train")
    if not 0 < n <= len(images):
        raise ValueError(f"n must be in 1..{len(images)}, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    return fashion_normalize(images[idx])


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Real colour photos that ship inside the scikit-image and scikit-learn wheels (no download), split by photo: the
# calibration crops (and any selection feeds cut from them) come from some photos, the evaluation crops from the
# others, so an evaluation figure is always on photos calibration never saw. The two views of the stereo motorcycle
# are one scene and stay together. Not used: the wheels' grey-scale, synthetic and texture images.
PHOTO_SPLITS = {
    "calibration": ("astronaut", "coffee", "china", "hubble_deep_field", "immunohistochemistry"),
    "evaluation": ("chelsea", "rocket", "motorcycle_left", "motorcycle_right", "flower", "retina"),
}
PHOTO_NAMES = PHOTO_SPLITS["calibration"] + PHOTO_SPLITS["evaluation"]
_CROP_SEEDS = {"calibration": 20261122, "evaluation": 7}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise MaterialMissing(f"{exc.name} is missing: run tools/setup_material.sh") from None
    if name in ("china", "flower"):
        samples = load_sample_images()
        img = {Path(f).stem: im for f, im in zip(samples.filenames, samples.images)}[name]
    elif name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skd.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        img = getattr(skd, name)()
    img = np.ascontiguousarray(np.asarray(img, np.uint8)[:, :, :3])
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"photo {name!r} is not an RGB image: shape {img.shape}")
    img.flags.writeable = False
    return img


def photos(split: str | None = None) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 RGB [H, W, 3]) for every photo of `split` ('calibration' or 'evaluation'), or of both."""
    if split is not None and split not in PHOTO_SPLITS:
        raise ValueError(f"split must be one of {sorted(PHOTO_SPLITS)}, got {split!r}")
    names = PHOTO_SPLITS[split] if split else PHOTO_NAMES
    return tuple((name, _photo(name)) for name in names)


def crop_boxes(split: str, n: int) -> list[tuple[int, int, int, int, bool]]:
    """The n crops of a split as (photo index in `photos(split)`, top, left, side, horizontal flip): square, side
    0.4-1.0 of the photo's shorter side, random position, flipped half of the time. The split's photos are taken
    in turn."""
    if split not in _CROP_SEEDS:
        raise ValueError(f"split must be one of {sorted(_CROP_SEEDS)}, got {split!r}")
    shapes = [img.shape[:2] for _, img in photos(split)]
    rng = np.random.default_rng(_CROP_SEEDS[split])
    boxes = []
    for i in range(n):
        k = i % len(shapes)
        h, w = shapes[k]
        side = int(round(rng.uniform(0.4, 1.0) * min(h, w)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        boxes.append((k, top, left, side, bool(rng.random() < 0.5)))
    return boxes


def photo_names(split: str, n: int) -> list[str]:
    """The photo each of the first n crops of `split` is cut from."""
    names = PHOTO_SPLITS[split]
    return [names[k] for k, *_ in crop_boxes(split, n)]


def imagenet_normalize(rgb_uint8_hwc: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [3, size, size]: antialiased bilinear resize (PIL), [0, 1], ImageNet
    mean/std."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb_uint8_hwc)).resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img, np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def photo_crops(split: str, n: int) -> np.ndarray:
    """n fixed random crops of real photos, resized to 224x224 and ImageNet-normalised: float32 [n, 3, 224, 224].
    split is 'calibration' or 'evaluation'; the two are cut from different photos (PHOTO_SPLITS)."""
    imgs = photos(split)
    out = np.empty((n, 3, 224, 224), np.float32)
    for i, (k, top, left, side, flip) in enumerate(crop_boxes(split, n)):
        crop = imgs[k][1][top:top + side, left:left + side]
        if flip:
            crop = crop[:, ::-1]
        out[i] = imagenet_normalize(crop)
    return out


WORDNET_NOUN = Path("/usr/share/wordnet/data.noun")
NOUN_SUPERSENSES = 26  # lex_filenum 03 (noun.Tops) .. 28 (noun.time)
_WORDNET_SEED = 0
# Regions of one seeded permutation of the glosses: the splits are disjoint whatever n is asked for.
_WORDNET_SPLITS = {"test": (0, 10_000), "calibration": (10_000, 15_000), "train": (15_000, None)}


@functools.lru_cache(maxsize=1)
def wordnet_nouns() -> tuple[tuple[str, ...], np.ndarray]:
    """Every WordNet noun gloss whose text is unique, in file order, and its supersense label 0..25 (int64)."""
    if not WORDNET_NOUN.exists():
        raise MaterialMissing(f"{WORDNET_NOUN} is missing: run tools/setup_material.sh")
    texts, labels = [], []
    with open(WORDNET_NOUN, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ", 2)
            lex = int(fields[1])
            if not 3 <= lex <= 28:
                raise ValueError(f"{WORDNET_NOUN}: unexpected lex_filenum {lex} in {line[:40]!r}")
            texts.append(line.split("|", 1)[1].strip())
            labels.append(lex - 3)
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    keep = [i for i, t in enumerate(texts) if counts[t] == 1]  # a gloss shared by synsets is ambiguous: dropped
    kept_labels = np.array([labels[i] for i in keep], np.int64)
    kept_labels.flags.writeable = False
    return tuple(texts[i] for i in keep), kept_labels


def wordnet_glosses(split: str, n: int) -> tuple[list[str], np.ndarray]:
    """(n gloss texts, their noun supersense labels 0..25 int64) from split 'train', 'test' or 'calibration':
    fixed, seeded and mutually disjoint random samples of the WordNet noun glosses."""
    if split not in _WORDNET_SPLITS:
        raise ValueError(f"split must be one of {sorted(_WORDNET_SPLITS)}, got {split!r}")
    texts, labels = wordnet_nouns()
    order = np.random.default_rng(_WORDNET_SEED).permutation(len(texts))
    start, stop = _WORDNET_SPLITS[split]
    region = order[start:stop]
    if not 0 < n <= len(region):
        raise ValueError(f"split {split!r} holds {len(region)} glosses, asked for {n}")
    idx = region[:n]
    return [texts[i] for i in idx], labels[idx]


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bicubic resampling, identical to torch's `interpolate(mode="bicubic",
    align_corners=False)`: half-pixel centres, Keys kernel with a = -0.75, taps clamped to the border."""

    def keys(d: np.ndarray) -> np.ndarray:
        d = np.abs(d)
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))

    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    frac = src - base
    m = np.zeros((n_out, n_in), np.float64)
    for k in (-1, 0, 1, 2):
        np.add.at(m, (np.arange(n_out), np.clip(base + k, 0, n_in - 1)), keys(frac - k))
    return m


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 labelled 8x8 digits, made MNIST-like for the MNIST CNN (models/mnist_cnn.py):
    (images float32 [1797, 1, 28, 28] MNIST-normalised, labels int64 [1797]).

    8x8 values 0..16 -> [0, 1] -> bicubic 16x16 (torch's bicubic, align_corners=False) clamped to [0, 1] -> centred
    in a 28x28 zero canvas (a 16-px digit in 28 px, like MNIST's 20-px box) -> (x - 0.1307) / 0.3081."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MaterialMissing("scikit-learn is missing: run tools/setup_material.sh") from e
    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0  # [N, 8, 8]
    w = _bicubic_matrix(8, 16)
    x16 = np.clip(np.einsum("oi,nij,pj->nop", w, x, w), 0.0, 1.0)
    canvas = np.zeros((len(x16), 28, 28), np.float64)
    canvas[:, 6:22, 6:22] = x16
    images = ((canvas - MNIST_MEAN) / MNIST_STD).astype(np.float32)[:, None]
    return images, digits.target.astype(np.int64)
