"""The recipe search (graphopt.search): front bookkeeping, budgets, labels, the time bound, the cache, the process
pool and Ray paths, the CLI's exit 0 / exit 1 cases and the HTML report. Real weights and images: the bundled
Fashion-MNIST CNN and its test images with their labels."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from graphopt.core.calibration import prepare_inputs
from graphopt.core.errors import UsageError
from graphopt.core.model import Model
from graphopt.core.runtime import RuntimeSettings
from graphopt.passes import Context
from graphopt.search import Budget, Fidelity, Point, Search, pareto

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "fashion_cnn.onnx"
DATA = EXAMPLES / "fashion_test.npz"


def _cli(*args, timeout=600):
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """96 of the bundled test images with their labels (fit 48, selection 24, verification 24)."""
    d = np.load(DATA)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, image=d["image"][:96], labels=d["labels"][:96])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One build cache for the module: searches with the same inputs and settings reuse each other's builds."""
    return tmp_path_factory.mktemp("cache")


def _ctx(data: Path, **kw) -> Context:
    model = Model.load(MODEL)
    return Context(inputs=prepare_inputs(model, data), runtime=RuntimeSettings(intra_op_threads=1), **kw)


# ------------------------------------------------------------------------------------------ bookkeeping
def _point(i, speedup, loss, status="measured"):
    return Point(i, (f"p{i}",), "single", status=status, speedup=speedup, loss=loss)


def test_pareto_marks_exactly_the_points_nothing_beats():
    pts = [_point(0, 1.0, 0.0), _point(1, 2.0, 0.5), _point(2, 1.5, 0.6), _point(3, 3.0, 2.0), _point(4, 2.5, 0.4),
           _point(5, 3.0, 2.0), _point(6, 9.0, None, status="failed"), _point(7, 4.0, float("inf"))]
    pareto(pts, lambda p: 1 / p.speedup)
    # 1 and 2 lose to 4 on both axes; 3 and 5 are equal (neither beats the other); failed and NaN-loss points
    # never count
    assert [p.on_front for p in pts] == [True, False, False, True, True, True, False, False]


def test_budget_needs_a_cost_and_a_floor_and_checks_ranges():
    with pytest.raises(UsageError, match="fidelity floor"):
        Budget(target_speedup=2)
    with pytest.raises(UsageError, match="cost budget"):
        Budget(min_cosine=0.99)
    with pytest.raises(UsageError, match="below 1"):
        Budget(target_speedup=0.5, min_cosine=0.99)
    with pytest.raises(UsageError, match="accuracy points"):
        Budget(target_speedup=2, max_drop=150)
    with pytest.raises(UsageError, match="out of range"):
        Budget(target_speedup=2, min_agreement=1.5)


def test_budget_scores_fidelity_on_the_floor_it_was_given():
    f = Fidelity(samples=10, cosine=0.995, rel_l2=0.1, agreement=0.92, accuracy=88.0, accuracy_original=89.5)
    assert f.drop == pytest.approx(1.5)
    drop = Budget(target_speedup=2, max_drop=1)
    assert drop.loss(f) == pytest.approx(1.5) and drop.fidelity_violations(f) == ["accuracy drop 1.50 points > 1"]
    agree = Budget(target_speedup=2, min_agreement=0.9)
    assert agree.loss(f) == pytest.approx(0.08) and agree.fidelity_violations(f) == []
    assert agree.loss_floor() == pytest.approx(0.1)
    cos = Budget(max_size_mb=1, min_cosine=0.999)
    assert cos.loss(f) == pytest.approx(0.005) and "cosine 0.9950 < 0.999" in cos.fidelity_violations(f)
    assert Budget(target_speedup=2, min_cosine=0.9).cost_violations(1.9, 1.0, 1.0) == ["speed-up 1.90x < 2x"]
    assert Budget(max_latency_ms=1, min_cosine=0.9).cost_violations(None, 1.5, 1.0) == ["latency 1.500 ms > 1 ms"]
    bad = Fidelity(samples=10, cosine=1.0, rel_l2=0.0, agreement=1.0, nonfinite=3)
    assert agree.loss(bad) == float("inf") and agree.fidelity_violations(bad) == ["3 new NaN/Inf values"]


def test_labels_in_the_npz_follow_their_samples_through_the_split(small_data):
    d = np.load(small_data)
    inputs = prepare_inputs(Model.load(MODEL), small_data)
    assert inputs.counts()["labelled"]
    for part in ("fit", "selection", "verification"):
        feeds, labels = getattr(inputs, part), inputs.labels[part]
        assert len(feeds) == len(labels) > 0
        for feed, label in zip(feeds, labels):
            (row,) = [i for i in range(len(d["image"])) if np.array_equal(d["image"][i], feed["image"][0])]
            assert label.tolist() == [d["labels"][row]]


def test_bad_labels_are_refused_in_one_line(tmp_path):
    from graphopt.core.errors import InputError

    d = np.load(DATA)
    np.savez(tmp_path / "short.npz", image=d["image"][:8], labels=d["labels"][:7])
    with pytest.raises(InputError, match="7 labels for 8 rows"):
        prepare_inputs(Model.load(MODEL), tmp_path / "short.npz")
    np.savez(tmp_path / "float.npz", image=d["image"][:8], labels=d["labels"][:8].astype(np.float32))
    with pytest.raises(InputError, match="1-D integer array"):
        prepare_inputs(Model.load(MODEL), tmp_path / "float.npz")


# ------------------------------------------------------------------------------------- search behaviour
def test_time_bound_stops_the_search_and_says_what_was_not_built(small_data, tmp_path):
    ctx = _ctx(small_data)
    bound = 0.05  # 3 s: the first wave starts, the rest must not
    t0 = time.perf_counter()
    result = Search(Model.load(MODEL), ctx, Budget(target_speedup=4, max_drop=1), families=["prune", "qdq"],
                    max_minutes=bound, cache_dir=tmp_path / "cache").run()
    took = time.perf_counter() - t0
    built = [p for p in result.points if p.status != "not built"]
    assert result.stopped_by_time
    assert any(p.status == "not built" and "time bound" in p.reason for p in result.points)
    # at most the wave that started inside the bound ran over it
    assert took < 60 * bound + sum(p.build_seconds for p in built) + 5 * len(built) + 10
    assert result.to_dict()["stopped_by_time"]


@pytest.fixture(scope="module")
def rerun(small_data, cache):
    """The same qdq levels searched twice under different speed budgets: a cold run (into a cache of its own,
    then copied into the module's) and a warm re-run."""
    model, own = Model.load(MODEL), cache.parent / "cold-cache"
    t0 = time.perf_counter()
    first = Search(model, _ctx(small_data), Budget(target_speedup=1.2, max_drop=2), families=["qdq"],
                   cache_dir=own).run()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = Search(model, _ctx(small_data), Budget(target_speedup=3, max_drop=2), families=["qdq"],
                   cache_dir=own).run()
    warm = time.perf_counter() - t0
    shutil.copytree(own, cache, dirs_exist_ok=True)
    return first, again, cold, warm, own


def test_cache_makes_a_rerun_with_another_budget_fast_and_identical(rerun, small_data):
    first, again, cold, warm, own = rerun
    assert [p.recipe for p in first.points] == [p.recipe for p in again.points]
    assert not any(p.cached for p in first.points) and all(p.cached for p in again.points)
    for a, b in zip(first.points, again.points):  # the same built models: the same selection figures
        assert a.built.model_bytes == b.built.model_bytes
        assert a.fidelity == b.fidelity
    assert warm < cold / 2, (cold, warm)
    # another seed (which the passes draw from): nothing in the cache fits
    other = Search(Model.load(MODEL), _ctx(small_data, seed=1), Budget(target_speedup=3, max_drop=2),
                   families=["qdq"], cache_dir=own)
    assert other.cache.get(other._job(first.points[0].recipe)) is None


def _qdq_search(small_data, cache_dir=False, **kw):
    return Search(Model.load(MODEL), _ctx(small_data), Budget(max_size_mb=0.1, max_drop=3), families=["qdq"],
                  cache_dir=cache_dir, **kw).run()


def test_process_pool_builds_in_other_processes(small_data):
    result = _qdq_search(small_data, workers=2)  # no cache: it must build
    assert result.executor == "process pool of 2"
    (point,) = result.points
    assert point.measured and point.built.worker.split(":")[1] != str(os.getpid())


def test_ray_path_builds_on_a_local_ray_instance(small_data, cache):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = _qdq_search(small_data, ray="auto")
    finally:
        ray.shutdown()
    assert result.executor.startswith("Ray")
    (point,) = result.points
    assert point.measured and point.built.worker.split(":")[1] != str(os.getpid())
    local = _qdq_search(small_data, cache_dir=cache)
    assert local.points[0].size_mb == pytest.approx(point.size_mb, rel=0.01)


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def found(small_data, cache, tmp_path_factory):
    """A search that meets its budget: int8 under a size budget, at most 3 accuracy points lost."""
    tmp = tmp_path_factory.mktemp("found")
    out = tmp / "m.onnx"
    proc = _cli("optimize", MODEL, "-o", out, "--calib", small_data, "--max-size-mb", "0.1", "--max-drop", "3",
                "--passes", "qdq", "--cache-dir", cache, "--report", tmp / "r.json",
                "--report-html", tmp / "r.html", "--threads", "1")
    return proc, out, tmp


def test_cli_search_exits_0_with_a_verified_model_and_its_reports(found):
    proc, out, tmp = found
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "search: [1]" in proc.stderr  # progress per candidate
    model = Model.load(out)
    assert model.byte_size() <= 0.1e6
    report = json.loads((tmp / "r.json").read_text())
    s = report["search"]
    chosen = next(p for p in s["points"] if p["id"] == s["chosen"])
    assert chosen["meets_cost"] and chosen["meets_floor"] and chosen["on_front"]
    assert s["verified"] == s["chosen"] and report["verification"]["passed"]
    assert report["accuracy"]["drop"] <= 3 and report["accuracy"]["samples"] == 24
    assert set(s["families"]) == {"qdq"} and "Chosen: qdq:max_size_mb=0.1" in s["families"]["qdq"]
    assert any(p["spec"].startswith("qdq") and p["decisions"] for p in report["passes"])


def test_cli_search_exits_1_with_the_front_when_nothing_meets_the_budget(small_data, cache, rerun, tmp_path):
    out = tmp_path / "m.onnx"  # the qdq levels are in the cache already (rerun): only timed here
    proc = _cli("optimize", MODEL, "-o", out, "--calib", small_data, "--target-speedup", "50", "--max-drop", "2",
                "--passes", "qdq", "--cache-dir", cache, "--report", tmp_path / "r.json", "--threads", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "no candidate met speed-up >= 50x" in last and "best reachable: [" in last and "nothing written" in last
    assert not out.exists()
    s = json.loads((tmp_path / "r.json").read_text())["search"]
    assert s["chosen"] is None and s["front"] and len(s["points"]) == 4  # qdq's levels, one for the floor
    (fastest,) = s["best_reachable"]  # every level met the floor, none the cost: the fastest is the best reachable
    points = s["points"]
    assert all(p["meets_floor"] and not p["meets_cost"] and p["cached"] for p in points)
    fastest = next(p for p in points if p["id"] == fastest)
    assert fastest["speedup"] == max(p["speedup"] for p in points) and fastest["on_front"]


@pytest.mark.parametrize("args, message", [
    (["--target-speedup", "2"], "fidelity floor"),
    (["--target-speedup", "2", "--min-cosine", "0.99", "--passes", "qdq,taylor_cache"], "cannot be searched"),
    (["--target-speedup", "2", "--max-drop", "1", "--calib", str(EXAMPLES / "fashion_test.npz"), "--max-error", "1"],
     "fidelity floor is"),
    (["--pass", "qdq", "--max-drop", "1"], "belong to a search"),
    (["--target-speedup", "2", "--min-cosine", "0.99", "--max-minutes", "0"], "must be positive"),
])
def test_cli_search_refuses_bad_usage_with_one_line(args, message, tmp_path):
    calib = [] if "--calib" in args else ["--calib", str(EXAMPLES / "fashion_test.npz")]
    proc = _cli("optimize", MODEL, "-o", tmp_path / "m.onnx", *calib, *args, "-q")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_max_drop_without_labels_is_refused(tmp_path):
    np.savez(tmp_path / "nolabels.npz", image=np.load(DATA)["image"][:64])
    proc = _cli("optimize", MODEL, "-o", tmp_path / "m.onnx", "--calib", tmp_path / "nolabels.npz",
                "--target-speedup", "2", "--max-drop", "1", "-q")
    assert proc.returncode == 2 and "--max-drop needs labels" in proc.stderr


# ------------------------------------------------------------------------------------------------ HTML
class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.rows, self.text, self.scripts = [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.images += [attrs.get("src", "")] if tag == "img" else []
        self.rows += tag == "tr"
        self.scripts += tag in ("script", "link")

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_is_self_contained_and_carries_the_json_data(found):
    proc, _, tmp = found
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp / "r.json").read_text())
    page = _Page()
    page.feed((tmp / "r.html").read_text())
    text = " ".join(page.text)
    assert page.scripts == 0 and all(src.startswith("data:image/png;base64,") for src in page.images)
    pytest.importorskip("matplotlib")
    assert len(page.images) == 1  # the front plot
    for p in report["search"]["points"]:
        assert p["label"] in text
    for d in next(p for p in report["passes"] if p["spec"].startswith("qdq"))["decisions"][:5]:
        assert d["site"] in text
    for m in report["verification"]["metrics"]:
        assert f"{m['cosine']:.6f}" in text
    assert "Before / after" in text and "Why each family got what it got" in text and "verification passed" in text


def test_html_report_renders_in_a_headless_browser(found):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (tools/setup_material.sh installs it)")
    plt = pytest.importorskip("matplotlib.pyplot")
    _, _, tmp = found
    shot = tmp / "page.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,1800", (tmp / "r.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = plt.imread(shot)
    assert pixels.shape[:2] == (1800, 1200)
    # a rendered page: text, tables and the plot, not a blank or an error page in one colour
    assert pixels[..., :3].std() > 0.05 and (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005
