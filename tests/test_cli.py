"""End-to-end tests of the real `graphopt` console script (subprocess), on tiny models built with onnx.helper.

Every CLI call pays the interpreter + import start-up (~1 s), so cases are shared and parametrized sparingly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

# --------------------------------------------------------------------------------------------- running the CLI
_SCRIPT = shutil.which("graphopt")
_BASE_CMD = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "graphopt.cli"]


def graphopt(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # the default 80-column width
    return subprocess.run([*_BASE_CMD, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def graphopt_all(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """Independent CLI calls (each a tuple of arguments) side by side, in order: separate processes that spend
    their time in start-up, so running them at once checks what running them one after the other did."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: graphopt(*args), calls))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every entry under folder, hidden ones (temp files) included."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int = 2, prefix: str = "graphopt: error:"):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix) and len(lines[0]) > len(prefix) + 3, proc.stderr


# --------------------------------------------------------------------------------------------- model builders
F = TensorProto.FLOAT


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *(helper.make_opsetid(d, v) for d, v in extra_opsets)])
    model.ir_version = ir_version
    return model


def conv_bn_model(batch=2, *, bn_mean_zero=False, conv_bias=True) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv -> BatchNormalization -> Relu -> Identity -> Flatten -> Gemm -> y[batch,5],
    plus a dead Neg branch nothing reads. `batch` may be a dim_param string such as "N"."""
    rng = np.random.default_rng(1234)  # weights independent of test order
    c = 4
    inits = [
        _init("conv_w", rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3),
        _init("bn_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        _init("bn_b", rng.uniform(-1, 1, c).astype(np.float32)),
        _init("bn_m", (np.zeros(c) if bn_mean_zero else rng.uniform(-1, 1, c)).astype(np.float32)),
        _init("bn_v", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        _init("fc_w", rng.standard_normal((c * 8 * 8, 5)).astype(np.float32) * 0.1),
        _init("fc_b", rng.standard_normal(5).astype(np.float32)),
        _init("dead_w", rng.standard_normal(3).astype(np.float32)),
    ]
    conv_inputs = ["x", "conv_w"]
    if conv_bias:
        inits.append(_init("conv_b", rng.standard_normal(c).astype(np.float32) * 0.1))
        conv_inputs.append("conv_b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        helper.make_node("Identity", ["relu"], ["ident"], name="ident"),
        helper.make_node("Flatten", ["ident"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc"),
        helper.make_node("Mul", ["dead_w", "dead_w"], ["dead_mul"], name="dead_mul"),  # nothing reads it
        helper.make_node("Neg", ["x"], ["dead_neg"], name="dead_neg"),  # nothing reads it
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [batch, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", F, [batch, 5])], inits)
    onnx.checker.check_model(model)
    return model


def if_model() -> onnx.ModelProto:
    """An If whose then-branch reads two outer-scope tensors (a node output and an initializer) that nothing at
    the top level reads, followed by an Identity."""
    rng = np.random.default_rng(1234)  # weights independent of test order
    then_g = helper.make_graph(
        [helper.make_node("Add", ["outer", "outer_bias"], ["then_out"], name="then_add")], "then_g", [],
        [helper.make_tensor_value_info("then_out", F, [2, 3])])
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"], name="else_neg")], "else_g", [],
        [helper.make_tensor_value_info("else_out", F, [2, 3])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="gt"),
        helper.make_node("Mul", ["x", "outer_scale"], ["outer"], name="outer_mul"),  # read only by then_g
        helper.make_node("If", ["cond"], ["if_out"], name="the_if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Identity", ["if_out"], ["y"], name="ident"),
    ]
    inits = [_init("zero", np.array(0.0, np.float32)),
             _init("outer_scale", rng.standard_normal((2, 3)).astype(np.float32)),
             _init("outer_bias", rng.standard_normal((2, 3)).astype(np.float32))]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])],
                   [helper.make_tensor_value_info("y", F, [2, 3])], inits)
    onnx.checker.check_model(model)
    return model


def custom_op_model() -> onnx.ModelProto:
    """x -> Relu -> com.example.MyOp -> Identity -> y, plus a dead Neg; onnxruntime cannot run MyOp."""
    rng = np.random.default_rng(1234)  # weights independent of test order
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MyOp", ["r", "w"], ["m"], name="my_op", domain="com.example", alpha=0.5),
        helper.make_node("Identity", ["m"], ["y"], name="ident"),
        helper.make_node("Neg", ["x"], ["dead"], name="dead_neg"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])],
                   [helper.make_tensor_value_info("y", F, [2, 3])],
                   [_init("w", rng.standard_normal((2, 3)).astype(np.float32))],
                   extra_opsets=[("com.example", 1)])
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def ort_run(path_or_model, feeds: dict) -> list[np.ndarray]:
    src = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------------------------- 1. optimize
def test_optimize_default_recipe_end_to_end(tmp_path):
    src = save(conv_bn_model(), tmp_path / "model.onnx")
    out = tmp_path / "model.opt.onnx"
    report = tmp_path / "r.json"
    digest = sha256(src)

    proc = graphopt("optimize", src, "-o", out, "--report", report)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote {out}" in proc.stdout.replace("\n", "")
    assert sha256(src) == digest, "the input model was modified"
    assert out.is_file()
    opt = onnx.load(str(out))
    onnx.checker.check_model(opt, full_check=True)
    ops = op_types(opt)
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert "Neg" not in ops and "Mul" not in ops  # the dead branch is gone
    assert ops.count("Conv") == 1 and ops.count("Gemm") == 1
    assert [i.name for i in opt.graph.input] == ["x"] and [o.name for o in opt.graph.output] == ["y"]
    assert {p.key for p in opt.metadata_props} >= {"graphopt"}

    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)
        (ref,), (new,) = ort_run(src, {"x": x}), ort_run(out, {"x": x})
        assert new.shape == (2, 5)
        np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)

    data = json.loads(report.read_text())
    assert {"passes", "verification", "before", "after", "latency"} <= set(data)
    assert data["verification"]["passed"] is True
    assert [p["name"] for p in data["passes"]] == ["remove_identity", "fold_constants", "fold_batchnorm",
                                                   "remove_dead"]
    by_name = {p["name"]: p for p in data["passes"]}
    assert by_name["fold_batchnorm"]["status"] == "applied"
    assert by_name["remove_identity"]["status"] == "applied"
    assert data["before"]["op_counts"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in data["after"]["op_counts"]
    assert data["after"]["nodes"] < data["before"]["nodes"]
    for side in ("before", "after"):
        lat = data["latency"][side]
        assert lat["runs"] >= 5 and lat["median_ms"] <= lat["p90_ms"]
    assert data["latency"]["shape"] == {"x": [2, 3, 8, 8]}
    # nothing but the output, the report and the input in the folder (no temp leftovers)
    assert listing(tmp_path) == {"model.onnx", "model.opt.onnx", "r.json"}


# --------------------------------------------------------------------------------------------- 2. pass selection
def test_optimize_selected_pass_only(tmp_path):
    src = save(conv_bn_model(), tmp_path / "model.onnx")
    proc = graphopt("optimize", src, "--pass", "remove_dead", "--no-latency", "-q", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # -q: no progress lines
    out = tmp_path / "model.opt.onnx"  # the default output name
    ops = op_types(onnx.load(str(out)))
    assert "Neg" not in ops and "Mul" not in ops
    assert "BatchNormalization" in ops and "Identity" in ops  # only remove_dead ran
    data = json.loads((tmp_path / "r.json").read_text())
    assert [(p["name"], p["status"]) for p in data["passes"]] == [("remove_dead", "applied")]
    assert data["latency"]["before"] is None  # --no-latency


def test_optimize_with_recipe(tmp_path):
    src = save(conv_bn_model(), tmp_path / "model.onnx")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[verify]\nmax_error = 1e-3\n\n[[pass]]\nname = "remove_identity"\n\n'
                      '[[pass]]\nname = "fold_batchnorm"\n')
    out = tmp_path / "out.onnx"
    proc = graphopt("optimize", src, "--recipe", recipe, "-o", out, "--report", tmp_path / "r.json",
                    "--no-latency")
    assert proc.returncode == 0, proc.stderr
    ops = op_types(onnx.load(str(out)))
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert "Neg" in ops  # remove_dead was not in the recipe
    data = json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in data["passes"]] == ["remove_identity", "fold_batchnorm"]
    assert data["tolerance"]["max_rel_l2"] == pytest.approx(1e-3)
    assert data["verification"]["passed"] is True


# --------------------------------------------------------------------------------------------- 3. inputs
def test_dynamic_batch_with_calibration_file(tmp_path):
    src = save(conv_bn_model(batch="N"), tmp_path / "dyn.onnx")
    calib = tmp_path / "x.npz"
    xs = np.random.default_rng(7).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(calib, x=xs)
    out = tmp_path / "dyn.opt.onnx"
    proc = graphopt("optimize", src, "--calib", calib, "-o", out, "--report", tmp_path / "r.json",
                    "--no-latency", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"]["synthetic"] is False
    assert sum(data["inputs"][k] for k in ("fit_samples", "selection_samples", "verification_samples")) == 6
    opt = onnx.load(str(out))
    assert opt.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # still dynamic
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(src, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_dynamic_batch_with_input_shape(tmp_path):
    src = save(conv_bn_model(batch="N"), tmp_path / "dyn.onnx")
    out = tmp_path / "o.onnx"
    proc = graphopt("optimize", src, "--input-shape", "x=2x3x8x8", "-o", out, "--report", tmp_path / "r.json",
                    "--no-latency", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["inputs"]["synthetic"] is True
    assert "BatchNormalization" not in op_types(onnx.load(str(out)))


# --------------------------------------------------------------------------------------------- 4. bad input
def _case_missing(d):
    return ["optimize", d / "missing.onnx"]


def _case_not_onnx(d):
    (d / "m.onnx").write_bytes(b"this is plainly not an ONNX model, just some text\n" * 20)
    return ["optimize", d / "m.onnx"]


def _case_truncated(d):
    data = conv_bn_model().SerializeToString()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["optimize", d / "m.onnx"]


def _save_external(d):
    onnx.save_model(conv_bn_model(), str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    assert (d / "w.data").is_file()


def _case_external_missing(d):
    _save_external(d)
    (d / "w.data").unlink()
    return ["optimize", d / "m.onnx"]


def _case_external_outside(d):
    _save_external(d)
    proto = onnx.load(str(d / "m.onnx"), load_external_data=False)
    moved = 0
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
                moved += 1
    assert moved
    onnx.save_model(proto, str(d / "m.onnx"))
    shutil.move(d / "w.data", d.parent / "outside.data")  # exists, and is big enough, but outside the folder
    return ["optimize", d / "m.onnx"]


def _case_old_opset(d):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [2, 3])],
               [helper.make_tensor_value_info("y", F, [2, 3])], opset=6, ir_version=3)
    save(m, d / "m.onnx")
    return ["optimize", d / "m.onnx"]


def _case_unknown_dims(d):
    # a dynamic batch alone defaults to 1 (test_bundled_model_without_calib); an unknown non-batch dim does not
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, ["N", "T"])],
               [helper.make_tensor_value_info("y", F, ["N", "T"])])
    save(m, d / "m.onnx")
    return ["optimize", d / "m.onnx"]


def _case_report_is_input(d):
    save(conv_bn_model(), d / "m.onnx")
    return ["optimize", d / "m.onnx", "--report", d / "m.onnx", "--overwrite"]  # --overwrite does not make it ok


def _case_report_is_output(d):
    save(conv_bn_model(), d / "m.onnx")
    return ["optimize", d / "m.onnx", "--report", d / "sub" / ".." / "out.onnx"]  # the harness's -o, respelled


def _case_report_exists(d):
    (d / "m.onnx").write_bytes(b"not a model: the report is refused before the model is even read")
    (d / "r.json").write_text('{"precious": true}')
    return ["optimize", d / "m.onnx", "--report", d / "r.json"]


def _case_calib_not_an_array_file(d):
    save(conv_bn_model(), d / "m.onnx")
    (d / "c.npz").write_text("x,y\n1,2\n")  # a CSV under the wrong name
    return ["optimize", d / "m.onnx", "--calib", d / "c.npz"]


def _case_calib_object_array(d):
    save(conv_bn_model(), d / "m.onnx")
    np.savez(d / "c.npz", x=np.array([{"a": 1}, None], dtype=object))
    return ["optimize", d / "m.onnx", "--calib", d / "c.npz"]


def _case_calib_nan(d):
    save(conv_bn_model(), d / "m.onnx")
    xs = np.random.default_rng(0).standard_normal((6, 2, 3, 8, 8)).astype(np.float32)
    xs[3, 1, 0, 2, 2] = np.nan
    np.savez(d / "c.npz", x=xs)
    return ["optimize", d / "m.onnx", "--calib", d / "c.npz"]


def token_model() -> onnx.ModelProto:
    """ids[N,4] int64 -> Cast -> Add x[N,4] float -> y."""
    nodes = [helper.make_node("Cast", ["ids"], ["idf"], to=F), helper.make_node("Add", ["x", "idf"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4]),
                          helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                  [helper.make_tensor_value_info("y", F, ["N", 4])])


def _case_calib_fractions_for_int64(d):
    save(token_model(), d / "m.onnx")
    np.savez(d / "c.npz", x=np.zeros((6, 4), np.float32), ids=np.full((6, 4), 2.5, np.float32))
    return ["optimize", d / "m.onnx", "--calib", d / "c.npz"]


def _case_recipe_unknown_pass(d):
    save(conv_bn_model(), d / "m.onnx")
    (d / "r.toml").write_text('[[pass]]\nname = "remove_dead"\n\n[[pass]]\nname = "no_such_pass"\n')
    return ["optimize", d / "m.onnx", "--recipe", d / "r.toml"]


def _case_recipe_unknown_param(d):
    save(conv_bn_model(), d / "m.onnx")
    (d / "r.toml").write_text('[verify]\nmax_error = 1e-3\n\n[[pass]]\nname = "remove_dead"\nbogus = 1\n')
    return ["optimize", d / "m.onnx", "--recipe", d / "r.toml"]


def _case_unknown_pass(d):
    save(conv_bn_model(), d / "m.onnx")
    return ["optimize", d / "m.onnx", "--pass", "nosuchpass"]


def _case_unknown_pass_param(d):
    save(conv_bn_model(), d / "m.onnx")
    return ["optimize", d / "m.onnx", "--pass", "remove_dead:bogus=1"]


def _case_empty(d):
    (d / "m.onnx").write_bytes(b"")
    return ["optimize", d / "m.onnx"]


def _case_calib_wrong_keys(d):
    save(conv_bn_model(), d / "m.onnx")
    np.savez(d / "c.npz", image=np.zeros((4, 2, 3, 8, 8), np.float32))
    return ["optimize", d / "m.onnx", "--calib", d / "c.npz"]


BAD_INPUTS = {
    "missing-path": (_case_missing, "no such file"),
    "not-onnx": (_case_not_onnx, "onnx model"),
    "truncated": (_case_truncated, "onnx model"),
    "empty-file": (_case_empty, "onnx model"),
    "calib-keys-not-input-names": (_case_calib_wrong_keys, "image"),
    "external-data-missing": (_case_external_missing, "missing"),
    "external-data-outside-folder": (_case_external_outside, "outside"),
    "opset-below-7": (_case_old_opset, "opset 6"),
    "unknown-dims": (_case_unknown_dims, "--input-shape"),
    "report-is-input": (_case_report_is_input, "is the input model"),
    "report-is-output": (_case_report_is_output, "is the output model"),
    "report-exists-no-overwrite": (_case_report_exists, "r.json: already exists"),
    "calib-not-an-array-file": (_case_calib_not_an_array_file, "is not an .npz file"),
    "calib-object-array": (_case_calib_object_array, "object array"),
    "calib-nan": (_case_calib_nan, "sample 3 (counting from 0): input 'x' holds 1 NaN/Inf"),
    "calib-fractions-for-int64": (_case_calib_fractions_for_int64, "would change values"),
    "recipe-unknown-pass": (_case_recipe_unknown_pass, "no_such_pass"),
    "recipe-unknown-param": (_case_recipe_unknown_param, "bogus"),
    "cli-unknown-pass": (_case_unknown_pass, "nosuchpass"),
    "cli-unknown-param": (_case_unknown_pass_param, "bogus"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every BAD_INPUTS case's real CLI run, each in its own folder, several at once: each call is a separate
    process that spends its time in start-up, so running them side by side checks exactly what one at a time did,
    in less wall time. Returns {case: (folder, listing before, digests before, output path, CompletedProcess or
    the exception it raised)}."""
    from concurrent.futures import ThreadPoolExecutor

    prepared = {}
    for case, (make_case, _) in BAD_INPUTS.items():
        root = tmp_path_factory.mktemp(f"bad_{case}")
        d = root / "case"
        d.mkdir()
        args = make_case(d)
        before = listing(root)
        digests = {p: sha256(root / p) for p in before if (root / p).is_file()}
        prepared[case] = (root, before, digests, d / "out.onnx", args)

    def one(case):
        *_, out, args = prepared[case]
        try:
            return graphopt(*args, "-o", out, "-q")
        except Exception as exc:  # re-raised by the case's own test
            return exc

    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 2) + 1)) as pool:
        futures = {case: pool.submit(one, case) for case in prepared}
        return {case: (*prepared[case][:4], f.result()) for case, f in futures.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_one_line_nothing_written(bad_input_runs, case):
    _, needle = BAD_INPUTS[case]
    root, before, digests, out, proc = bad_input_runs[case]
    if isinstance(proc, Exception):
        raise proc

    assert_one_error_line(proc, 2)
    assert needle.lower() in proc.stderr.lower(), proc.stderr
    assert "allow_pickle" not in proc.stderr  # numpy's advice is never the fix
    assert not out.exists()
    assert listing(root) == before, "files were created (output, temp files or default output)"
    assert {p: sha256(root / p) for p in digests} == digests, "an input file was modified"


def test_output_equal_to_input_is_refused(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    digest, before = sha256(src), listing(tmp_path)
    proc = graphopt("optimize", src, "-o", src, "-q")
    assert_one_error_line(proc, 2)
    assert "input" in proc.stderr
    assert sha256(src) == digest
    assert listing(tmp_path) == before
    # the same file under another spelling is still the input
    proc = graphopt("optimize", "m.onnx", "-o", "./sub/../m.onnx", "-q", cwd=tmp_path)
    assert_one_error_line(proc, 2)
    assert sha256(src) == digest


def test_existing_output_needs_overwrite(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"precious")
    before = listing(tmp_path)

    proc = graphopt("optimize", src, "-o", out, "-q", "--no-latency")
    assert_one_error_line(proc, 2)
    assert "already exists" in proc.stderr
    assert out.read_bytes() == b"precious"
    assert listing(tmp_path) == before

    proc = graphopt("optimize", src, "-o", out, "-q", "--no-latency", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "BatchNormalization" not in op_types(onnx.load(str(out)))
    assert listing(tmp_path) == before  # replaced in place, no temp leftovers


def test_output_that_is_a_folder_is_bad_input_even_with_overwrite(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    (tmp_path / "outdir").mkdir()
    before = listing(tmp_path)
    for extra in ([], ["--overwrite"]):
        proc = graphopt("optimize", src, "-o", tmp_path / "outdir", "-q", "--no-latency", *extra)
        assert_one_error_line(proc, 2)
        assert "is a folder" in proc.stderr
        assert listing(tmp_path) == before


def test_existing_report_is_replaced_with_overwrite(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    (tmp_path / "r.json").write_text("old")
    proc = graphopt("optimize", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--overwrite", "-q",
                    "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["passed"] is True


def test_calibration_dtypes_converted_with_one_note_per_input(tmp_path):
    src = save(token_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((12, 4)),  # float64 for a float32 input
             ids=rng.integers(0, 50, (12, 4)).astype(np.int32))  # int32 for an int64 input
    proc = graphopt("optimize", src, "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.onnx", "--no-latency")
    assert proc.returncode == 0, proc.stderr
    err = " ".join(proc.stderr.split())  # rich may wrap progress lines
    assert err.count("note: calibration input 'x': float64 data converted to float32") == 1, proc.stderr
    assert err.count("note: calibration input 'ids': int32 data converted to int64") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_in_missing_folder_is_bad_input(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    before = listing(tmp_path)
    proc = graphopt("optimize", src, "-o", tmp_path / "out.onnx", "--report", tmp_path / "nodir" / "r.json",
                    "-q", "--no-latency")
    assert listing(tmp_path) == before  # holds today too: the model is not written
    assert_one_error_line(proc, 2)


def test_error_message_is_one_line_at_default_width(tmp_path):
    long_dir = tmp_path / ("a_rather_long_folder_name_" * 3)
    long_dir.mkdir()
    proc = graphopt("optimize", long_dir / "missing_model_file.onnx", "-q")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------------------------- 5. verification
def test_compare_models_that_differ_exit_1(tmp_path):
    base = conv_bn_model()
    a = save(base, tmp_path / "a.onnx")
    changed = onnx.ModelProto()
    changed.CopyFrom(base)
    for t in changed.graph.initializer:
        if t.name == "fc_w":
            t.CopyFrom(_init("fc_w", numpy_helper.to_array(t) * 1.5 + 0.1))
    b = save(changed, tmp_path / "b.onnx")

    proc, same = graphopt_all(("compare", a, b), ("compare", a, a))
    assert_one_error_line(proc, 1, prefix="graphopt: verification failed:")
    assert "relative L2 error" in proc.stderr

    assert same.returncode == 0, same.stderr
    assert "within tolerance" in same.stdout


def test_optimize_final_verification_failure_needs_force(tmp_path):
    """A real failure: folding BatchNormalization is exact in maths but not bit-exact in float32. With
    `--max-abs-error 0`, the per-pass check (on the first 32 verification samples) sees all-zero inputs, where
    the folded model is bit-identical (no conv bias, BN mean 0), so the fold is applied; the final check runs on
    every verification sample, including random ones where rounding differs, and fails."""
    src = save(conv_bn_model(bn_mean_zero=True, conv_bias=False), tmp_path / "m.onnx")
    n = 160  # -> 40 verification samples, of which the pipeline's per-pass check uses the first 32
    order = np.random.default_rng(0).permutation(n)  # calibration.split_samples with --seed 0
    xs = np.zeros((n, 2, 3, 8, 8), np.float32)
    rng = np.random.default_rng(3)
    for i in order[32:]:
        xs[i] = rng.standard_normal((2, 3, 8, 8))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=xs)
    out = tmp_path / "out.onnx"
    args = ["optimize", src, "--calib", calib, "-o", out, "--max-abs-error", "0", "--no-latency", "-q"]
    before = listing(tmp_path)

    proc = graphopt(*args)
    assert_one_error_line(proc, 1, prefix="graphopt: verification failed:")
    assert "max abs error" in proc.stderr
    assert not out.exists()
    assert listing(tmp_path) == before

    proc = graphopt(*args, "--force", "--report", tmp_path / "r.json")
    assert proc.returncode == 1, proc.stderr
    assert "written by --force" in proc.stdout.replace("\n", " ")
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verification"]["passed"] is False
    assert {p["name"]: p["status"] for p in data["passes"]}["fold_batchnorm"] == "applied"
    assert data["verification"]["metrics"][0]["max_abs"] > 0


# --------------------------------------------------------------------------------------------- 6. subgraphs, custom ops
def test_optimize_keeps_if_subgraph_and_outer_scope_reads(tmp_path):
    src = save(if_model(), tmp_path / "if.onnx")
    out = tmp_path / "if.opt.onnx"
    proc = graphopt("optimize", src, "-o", out, "--no-latency", "-q", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["passed"] is True
    original, opt = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(opt, full_check=True)
    ifs = [n for n in opt.graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    orig_if = next(n for n in original.graph.node if n.op_type == "If")
    assert ({a.name: a.g.SerializeToString() for a in ifs[0].attribute}
            == {a.name: a.g.SerializeToString() for a in orig_if.attribute}), "the If's subgraphs changed"
    assert "outer_mul" in [n.name for n in opt.graph.node]  # its output is read only inside the subgraph
    assert "outer_bias" in {t.name for t in opt.graph.initializer}  # read only inside the subgraph
    assert "Identity" not in op_types(opt)
    for sign in (1.0, -1.0):  # both branches
        x = (np.abs(np.random.default_rng(5).standard_normal((2, 3))) * sign).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(src, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_custom_domain_node_inspect_and_passes(tmp_path):
    from graphopt import load
    from graphopt.core.calibration import InputSet
    from graphopt.core.errors import UsageError
    from graphopt.passes import REGISTRY, Context, create

    src = save(custom_op_model(), tmp_path / "custom.onnx")
    proc = graphopt("inspect", src, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["op_counts"]["com.example.MyOp"] == 1
    assert info["opsets"]["com.example"] == 1

    model = load(src)
    for name in sorted(REGISTRY):
        if name == "recover":  # it trains in torch, which cannot run MyOp: a clear refusal, never a silent skip
            with pytest.raises(UsageError, match="cannot run com.example.MyOp"):
                create(name).preflight(model, InputSet(fit=[{}], selection=[], verification=[{}]))
            continue
        if name == "layermerge":  # it merges convs and this model has none: a clear refusal too
            with pytest.raises(UsageError, match="no Conv node"):
                create(name).preflight(model, InputSet(fit=[{}], selection=[], verification=[{}]))
            continue
        if name == "taylor_cache":  # it caches a diffusion denoiser's blocks and this is none: a clear refusal
            with pytest.raises(UsageError, match="not a one-step denoiser"):
                create(name).preflight(model, InputSet(fit=[{}], selection=[], verification=[{}]))
            continue
        result = create(name).run(model, Context())
        nodes = [n for n in result.model.graph.node if n.domain == "com.example"]
        assert len(nodes) == 1, name
        assert nodes[0].op_type == "MyOp" and [a.name for a in nodes[0].attribute] == ["alpha"], name
        assert "w" in {t.name for t in result.model.graph.initializer}, name  # MyOp's weight stays
    dead = create("remove_dead").run(model, Context())
    assert dead.changed and "Neg" not in op_types(dead.model.proto)
    ident = create("remove_identity").run(model, Context())
    assert "Identity" not in op_types(ident.model.proto)
    assert [o.name for o in ident.model.graph.output] == ["y"]
    my_op = next(n for n in ident.model.graph.node if n.op_type == "MyOp")
    assert list(my_op.output) == ["y"]  # MyOp now writes the graph output itself


# --------------------------------------------------------------------------------------------- 7. inspect, bench, help
def test_inspect_table_and_json(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    proc, as_json = graphopt_all(("inspect", src), ("inspect", "--json", src))
    assert proc.returncode == 0, proc.stderr
    for word in ("BatchNormalization", "Conv", "Gemm", "x", "y", "parameters"):
        assert word in proc.stdout

    proc = as_json
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["op_counts"] == {"Conv": 1, "BatchNormalization": 1, "Relu": 1, "Identity": 1, "Flatten": 1,
                                 "Gemm": 1, "Mul": 1, "Neg": 1}
    assert info["nodes"] == 8
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 8, 8]}]
    assert [o["name"] for o in info["outputs"]] == ["y"]
    expected = sum(int(np.prod(t.dims)) for t in onnx.load(str(src)).graph.initializer)
    assert info["parameters"] == expected == 4 * 27 + 4 * 4 + 256 * 5 + 5 + 3 + 4


def test_bench_prints_median(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    proc = graphopt("bench", src, "--repeats", "5", "--warmup", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "median" in proc.stdout and "ms" in proc.stdout
    assert "x=2x3x8x8" in proc.stdout and "(1 thread," in proc.stdout and "1 threads" not in proc.stdout


BUNDLED = Path(__file__).resolve().parent.parent / "examples" / "fashion_cnn.onnx"  # dynamic batch


@pytest.mark.skipif(not BUNDLED.is_file(), reason="examples/fashion_cnn.onnx is not in this checkout")
def test_bundled_model_without_calib(tmp_path):
    """The README's `graphopt bench model.onnx --threads 1` as written, on the bundled model (dynamic batch, no
    --calib): a dynamic batch defaults to 1, and the output says so. compare and optimize alike."""
    out = tmp_path / "o.onnx"
    bench, compare, optimize = graphopt_all(("bench", BUNDLED, "--threads", "1", "--repeats", "5", "--warmup", "1"),
                                            ("compare", BUNDLED, BUNDLED),
                                            ("optimize", BUNDLED, "-o", out, "--no-latency"))
    proc = bench
    assert proc.returncode == 0, proc.stderr
    assert "image=1x1x28x28" in proc.stdout and "(1 thread," in proc.stdout
    assert "batch 1 on the dynamic batch axis" in " ".join(proc.stderr.split())

    proc = compare
    assert proc.returncode == 0, proc.stderr
    assert "within tolerance" in proc.stdout and "batch 1" in proc.stderr

    proc = optimize
    assert proc.returncode == 0, proc.stderr
    assert "batch 1 on the dynamic batch axis" in " ".join(proc.stderr.split())
    assert out.is_file() and "BatchNormalization" not in op_types(onnx.load(str(out)))


def test_help():
    from graphopt.recipe import passes_taking

    proc, optimize_help = graphopt_all(("--help",), ("optimize", "--help"))
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "graphopt optimize model.onnx" in proc.stdout
    assert "exit codes" in proc.stdout
    proc = optimize_help
    assert proc.returncode == 0
    for flag in ("--calib", "--pass", "--recipe", "--overwrite", "--force", "--input-shape"):
        assert flag in proc.stdout
    text = " ".join(proc.stdout.split())
    assert {"qdq", "prune", "lowrank"} <= set(passes_taking("target_speedup"))  # the budgets' passes, registry-made
    assert f"({', '.join(passes_taking('target_speedup'))}): X times faster" in text
    assert f"({', '.join(passes_taking('max_size_mb'))}): the output at most" in text


def test_every_pass_parameter_is_documented():
    """The README's parameter reference is the text generated from the registry (regenerate it with
    `graphopt passes --markdown`), so every parameter and default of every registered pass is in it."""
    import dataclasses

    from graphopt.passes import REGISTRY
    from graphopt.recipe import passes_markdown

    from graphopt.recipe import README_BEGIN, README_END

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    documented = readme.split(README_BEGIN)[1].split(README_END)[0].splitlines()
    generated = passes_markdown().splitlines()
    stale = "README's pass parameters are stale: paste what `graphopt passes --markdown` prints"
    for name, cls in REGISTRY.items():
        fields = dataclasses.fields(cls)
        if not fields:
            assert any(f"`{name}`" in line and "no parameters" in line for line in documented), (name, stale)
            continue
        header = next(line for line in generated if line.startswith(f"`{name}`:"))
        assert header in documented, (name, stale)
        start = documented.index(header)
        rows = [line for line in documented[start + 2:] if line.startswith("|")][2:len(fields) + 2]
        # name, type and default of every parameter, in its own pass's table (the meaning may be reworded)
        want = [line.rsplit(" | ", 1)[0] for line in generated[generated.index(header) + 4:][:len(fields)]]
        assert [line.rsplit(" | ", 1)[0] for line in rows] == want, (name, stale)
        assert all(f"| `{f.name}` |" in line for f, line in zip(fields, rows))
    proc = graphopt("passes")
    assert proc.returncode == 0, proc.stderr
    assert "latency_slack" in proc.stdout and "default 0.1" in proc.stdout and "refit_rows" in proc.stdout


def test_import_graphopt_is_light_and_export_is_the_function():
    """The console script can catch a Ctrl-C only once its own code runs: `import graphopt` must not pull onnx,
    onnxruntime, numpy or rich (they load on first use), and `graphopt.export` stays the function."""
    code = ("import sys, graphopt, graphopt._entry\n"
            "heavy = [m for m in ('onnx', 'onnxruntime', 'numpy', 'rich', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import graphopt.export\n"
            "assert callable(graphopt.export) and graphopt.export.__name__ == 'export', graphopt.export\n"
            "assert graphopt.Model.__name__ == 'Model' and graphopt.passes.REGISTRY\n"
            "from graphopt import Tolerance, QDQ\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _console_script() -> list[str]:
    """The installed script itself, not a shell shim in front of it (pyenv's adds ~0.1 s of bash)."""
    beside = Path(sys.executable).with_name("graphopt")
    return [str(beside)] if beside.is_file() else _BASE_CMD


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child process")
def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path):
    """Ctrl-C while the package's imports (onnx, onnxruntime, numpy, rich) load, and a little later: exit 130,
    one line, no traceback. Several timings, so some interrupt the imports whatever this machine's speed."""
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    hit = 0
    for delay in (0.3, 0.6, 0.9, 1.2, 1.6):
        proc = subprocess.Popen([*_console_script(), "inspect", str(src)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        if proc.poll() is not None:  # finished before the signal: nothing to learn from this timing
            proc.communicate()
            continue
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "Traceback" not in out, (delay, err)
        if proc.returncode == -signal.SIGINT:  # killed outside Python code (interpreter start or shutdown): silent
            assert err == "", (delay, err)
            continue
        if proc.returncode == 0:  # it finished as the signal was sent
            continue
        hit += 1
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert err.strip().splitlines() == ["graphopt: interrupted; nothing was written"], (delay, err)
    assert hit >= 1, "no run was interrupted while graphopt ran: the test checked nothing"


def test_bad_usage_is_one_line_exit_2():
    missing, unknown = graphopt_all(("optimize",), ("frobnicate",))  # missing the model argument: argparse error
    assert_one_error_line(missing, 2)
    assert_one_error_line(unknown, 2)
