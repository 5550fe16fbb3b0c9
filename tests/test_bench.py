"""The benchmark harness (tools/bench): evaluation sets, metrics, and a small end-to-end run on the bundled model."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench import datasets, metrics  # noqa: E402


# ------------------------------------------------------------------------------------------------------ datasets
def _material(fn, *args):
    try:
        return fn(*args)
    except datasets.MaterialMissing as exc:
        pytest.skip(str(exc))


def test_photo_crops_shapes_and_disjoint_splits():
    calib = _material(datasets.photo_crops, "calibration", 6)
    evals = _material(datasets.photo_crops, "evaluation", 9)
    assert calib.shape == (6, 3, 224, 224) and calib.dtype == np.float32
    assert evals.shape == (9, 3, 224, 224) and evals.dtype == np.float32
    assert np.isfinite(calib).all() and np.isfinite(evals).all()
    # ImageNet normalisation: values of [0, 1] pixels map into roughly [-2.2, 2.7]
    assert -2.2 <= calib.min() and calib.max() <= 2.7
    # the crops are fixed (seeded) ...
    np.testing.assert_array_equal(calib, datasets.photo_crops("calibration", 6))
    # ... a prefix of a longer request, and never shared between the splits
    np.testing.assert_array_equal(calib[:3], datasets.photo_crops("calibration", 3))
    for a in calib:
        assert not any(np.array_equal(a, b) for b in evals)
    with pytest.raises(ValueError):
        datasets.photo_crops("train", 1)


def test_crop_geometry():
    for split in ("calibration", "evaluation"):
        shapes = [img.shape[:2] for _, img in _material(datasets.photos, split)]
        assert len(shapes) == len(datasets.PHOTO_SPLITS[split]) >= 5
        for k, top, left, side, flip in datasets.crop_boxes(split, 200):
            h, w = shapes[k]
            assert 0.4 * min(h, w) - 1 <= side <= min(h, w)
            assert 0 <= top <= h - side and 0 <= left <= w - side


def test_photo_split_no_photo_in_both():
    cal, ev = (set(datasets.PHOTO_SPLITS[s]) for s in ("calibration", "evaluation"))
    assert cal and ev and not cal & ev
    assert len(datasets.PHOTO_NAMES) == len(set(datasets.PHOTO_NAMES)) == len(cal) + len(ev)
    # the two views of the stereo motorcycle are one scene: never on both sides
    assert {"motorcycle_left", "motorcycle_right"} <= ev or {"motorcycle_left", "motorcycle_right"} <= cal
    # every crop of a split is cut from that split's photos, and each split uses all of its photos
    for split, names in (("calibration", cal), ("evaluation", ev)):
        used = set(datasets.photo_names(split, 200))
        assert used == names
    # the pixels differ too: no photo of one split is (a copy of) a photo of the other
    photos_c = dict(_material(datasets.photos, "calibration"))
    photos_e = dict(datasets.photos("evaluation"))
    for a in photos_c.values():
        for b in photos_e.values():
            assert a.shape != b.shape or not np.array_equal(a, b)
    for img in (*photos_c.values(), *photos_e.values()):  # colour photos only
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        assert np.abs(img[..., 0].astype(int) - img[..., 1]).mean() > 1.0  # not grey
    with pytest.raises(ValueError):
        datasets.photos("train")


def test_searching_contender_selects_on_feeds_it_does_not_fit_on():
    from bench import contenders  # noqa: F401  (registers graphopt's contenders first)
    from bench.graphopt_contenders import split_feeds

    feeds = [{"image": np.full((8, 3, 2, 2), i, np.float32)} for i in range(12)]
    inputs = split_feeds(feeds, searches=True)
    fit_ids = {int(f["image"][0, 0, 0, 0]) for f in inputs.fit}
    sel_ids = {int(f["image"][0, 0, 0, 0]) for f in inputs.selection}
    assert len(fit_ids) == 9 and len(sel_ids) == 3 and not fit_ids & sel_ids
    assert inputs.for_selection is inputs.selection
    assert {int(f["image"][0, 0, 0, 0]) for f in inputs.verification} <= fit_ids
    plain = split_feeds(feeds, searches=False)
    assert len(plain.fit) == 12 and plain.selection == []


def test_wordnet_splits_are_disjoint_and_labelled():
    train, ytr = _material(datasets.wordnet_glosses, "train", 4000)
    test, yte = datasets.wordnet_glosses("test", 2000)
    calib, yca = datasets.wordnet_glosses("calibration", 256)
    assert (len(train), len(test), len(calib)) == (4000, 2000, 256)
    for y in (ytr, yte, yca):
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < datasets.NOUN_SUPERSENSES
    assert not set(train) & set(test) and not set(train) & set(calib) and not set(test) & set(calib)
    assert all(isinstance(t, str) and t and "|" not in t for t in train[:100])
    assert len(set(ytr)) > 20  # a real 26-way task, not one class
    assert datasets.wordnet_glosses("test", 10)[0] == test[:10]  # fixed and a prefix
    with pytest.raises(ValueError):
        datasets.wordnet_glosses("test", 10**6)


def test_wordnet_parsing_of_a_known_entry():
    texts, labels = _material(datasets.wordnet_nouns)
    # 'patient': "10405694 18 n 01 patient 0 ... | a person who requires medical care; ..." (18 = noun.person)
    i = texts.index('a person who requires medical care; "the number of emergency patients has grown rapidly"')
    assert labels[i] == 18 - 3


def test_fashion_sets():
    x, y = _material(datasets.fashion_test)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    calib = datasets.fashion_calibration(64)
    assert calib.shape == (64, 1, 28, 28) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib, datasets.fashion_calibration(64))


# ------------------------------------------------------------------------------------------------------- metrics
def test_accuracy_and_agreement():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert metrics.top1_accuracy(logits, np.array([0, 1, 1, 0])) == 0.75
    other = np.array([[0.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    assert metrics.top1_agreement(logits, other) == 0.75
    assert metrics.top1_agreement(logits, logits) == 1.0
    with pytest.raises(ValueError):
        metrics.top1_accuracy(logits, np.array([0, 1]))


def test_kl_hand_computed():
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([0, ln 3]) = (1/4, 3/4)
    ref = np.array([[0.0, 0.0]])
    cand = np.array([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.mean_kl(ref, cand) == pytest.approx(expected, rel=1e-12)
    # shifting logits changes nothing; identical rows give 0; mean over rows
    assert metrics.mean_kl(ref + 7, cand - 3) == pytest.approx(expected, rel=1e-12)
    assert metrics.mean_kl(np.vstack([ref, ref]), np.vstack([cand, ref])) == pytest.approx(expected / 2, rel=1e-12)
    big = np.array([[1000.0, -1000.0, 0.0]])
    assert metrics.mean_kl(big, big) == 0.0  # stable for large logits


def test_cosine_hand_computed():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0]])
    assert metrics.mean_cosine(a, b) == pytest.approx((0.0 + 1.0 + 1.0) / 3)
    assert metrics.mean_cosine(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0]])) == pytest.approx(24 / 25)
    assert metrics.mean_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]])) == 0.0


def test_probe_accuracy():
    w = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([0.0, 0.5])
    x = np.array([[1.0, 0.0], [0.2, 0.0], [0.0, 1.0]])  # scores [1, .5], [.2, .5], [0, 1.5]
    assert list(metrics.probe_predict(x, w, b)) == [0, 1, 1]
    assert metrics.probe_accuracy(x, np.array([0, 0, 1]), w, b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.probe_predict(np.ones((2, 3)), w, b)


def test_relative_error_and_sample_accuracy():
    ref = np.array([[[3.0, 4.0]], [[1.0, 0.0]]])  # per-sample norms 5 and 1
    cand = np.array([[[3.0, 4.5]], [[1.0, 0.0]]])
    np.testing.assert_allclose(metrics.relative_errors(ref, cand), [0.1, 0.0])
    assert metrics.mean_relative_error(ref, cand) == pytest.approx(0.05)
    assert metrics.relative_errors(np.zeros((1, 2)), np.ones((1, 2)))[0] == math.inf
    assert metrics.sample_class_accuracy(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 1])) == 0.5


# ------------------------------------------------------------------------------------------------------ harness
def test_contender_registry():
    from bench import contenders

    assert {"fp32", "ort_minmax", "ort_percentile", "ort_entropy"} <= set(contenders.CONTENDERS)
    with pytest.raises(ValueError):
        contenders.contender("fp32")(lambda *a: None)
    with pytest.raises(KeyError):
        contenders.get("nope")


def test_harness_fp32_and_minmax_on_bundled_model(tmp_path):
    _material(datasets.fashion_test)
    from bench import run

    out = tmp_path / "fashion_cnn.md"
    code = run.main(["--model", "fashion_cnn", "--contenders", "fp32,ort_minmax", "--limit", "500",
                     "--latency-seconds", "0.1", "--latency-warmup", "2", "--cache", str(tmp_path / "cache"),
                     "--latency-batches", "1", "--out", str(out)])
    assert code == 0
    text = out.read_text()
    assert "run.py --model fashion_cnn" in text and "load average" in text and "onnxruntime" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    headers = [c.strip() for c in table[0].strip("|").split("|")]
    assert headers == ["contender", "top-1 acc", "agree w/ fp32", "latency median (ms)", "p90 (ms)", "speed-up",
                       "size (MB)", "params", "opt. time (s)", "notes"]
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(headers, cells))
    assert set(rows) == {"fp32", "fp32_twin", "ort_minmax"}
    acc = {k: float(r["top-1 acc"].rstrip("%")) for k, r in rows.items() if k != "fp32_twin"}
    assert acc["fp32"] > 85.0
    assert abs(acc["ort_minmax"] - acc["fp32"]) < 3.0
    assert rows["fp32"]["speed-up"] == "1.00×" and rows["fp32"]["agree w/ fp32"] == "100.00%"
    assert float(rows["ort_minmax"]["size (MB)"]) < float(rows["fp32"]["size (MB)"]) / 2  # int8 weights
    assert "failed" not in rows["ort_minmax"]["notes"]
    for r in rows.values():  # a median never above its p90
        assert float(r["latency median (ms)"]) <= float(r["p90 (ms)"])
    # the noise floor: a second session of the fp32 file, timed in the same run; batch and threads stated
    assert "noise floor" in text and "**batch / threads**: batch 1; 2 intra-op threads" in text
    assert rows["fp32_twin"]["top-1 acc"] == "–" and rows["fp32_twin"]["size (MB)"] == rows["fp32"]["size (MB)"]


def test_harness_times_each_latency_batch_with_its_own_noise_floor(tmp_path):
    _material(datasets.fashion_test)
    from bench import compare, run

    out = tmp_path / "fashion_cnn.md"
    code = run.main(["--model", "fashion_cnn", "--contenders", "fp32", "--limit", "100", "--latency-seconds", "0.05",
                     "--latency-warmup", "1", "--latency-batches", "1,8", "--cache", str(tmp_path / "cache"),
                     "--out", str(out)])
    assert code == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    headers = [c.strip() for c in table[0].strip("|").split("|")]
    assert headers == ["contender", "top-1 acc", "agree w/ fp32", "latency b1 (ms)", "p90 b1 (ms)", "speed-up b1",
                       "latency b8 (ms)", "speed-up b8", "size (MB)", "params", "opt. time (s)", "notes"]
    rows = compare.tables(text)["fashion_cnn"]
    assert rows["fp32"]["speed-up b1"] == rows["fp32"]["speed-up b8"] == "1.00×"
    assert float(rows["fp32"]["latency b8 (ms)"]) > 0 and float(rows["fp32_twin"]["latency b8 (ms)"]) > 0
    assert "**batch / threads**: batches 1, 8" in text and "`image` [8, 1, 28, 28]" in text
    floor = next(line for line in text.splitlines() if line.startswith("- **noise floor**"))
    assert "batch 1: `fp32_twin`" in floor and "batch 8: `fp32_twin`" in floor
    differences, timings = compare.compare(text, text)  # per-batch latencies are timing, not metrics
    assert differences == [] and any("latency b8" in t for t in timings)
    with pytest.raises(SystemExit):
        run.parse(["--model", "fashion_cnn", "--latency-batches", "0,16"])


def test_harness_records_a_failing_contender(tmp_path):
    _material(datasets.fashion_test)
    from bench import contenders, harness

    name = "test_always_fails"
    contenders.CONTENDERS.pop(name, None)

    @contenders.contender(name)
    def _fails(fp32_path, feeds, workdir):
        raise RuntimeError("deliberate failure")

    try:
        result = harness.run_task("fashion_cnn", [name], limit=100, cache=tmp_path,
                                  latency=harness.LatencyConfig(warmup=1, repeats=5, min_seconds=0.01))
    finally:
        contenders.CONTENDERS.pop(name, None)
    text = result.markdown()
    assert "**failed**: RuntimeError: deliberate failure" in text
    assert [r.name for r in result.rows] == ["fp32", "fp32_twin", name]


def test_compare_tables():
    from bench import compare

    a = ("## m\n\n| contender | acc | latency median (ms) | p90 (ms) | notes |\n|---|---:|---:|---:|---|\n"
         "| `fp32` | 90.00% | 1.000 | 2.000 | |\n| `q` | 89.00% | 0.500 | 1.000 | x |\n")
    b = a.replace("0.500", "0.550").replace("| x |", "| y |")
    differences, timings = compare.compare(a, b)
    assert differences == [] and any("+10.0%" in t for t in timings)
    differences, _ = compare.compare(a, a.replace("89.00%", "88.00%"))
    assert differences == ["m / q / acc: 89.00% vs 88.00%"]


def test_wait_for_quiet():
    from bench.harness import wait_for_quiet

    waited, ok = wait_for_quiet(1e9, timeout=1.0)  # any load is below 1e9: returns at once, quiet
    assert ok
    waited, ok = wait_for_quiet(-1.0, timeout=0.0, poll=0.01)  # a load average is never below -1
    assert not ok
