"""`graphopt export`: torch -> ONNX with a torch-vs-onnxruntime check, through the real console script and the
Python API. Module files are written into tmp_path and imported from there (the command's cwd), as a user would.

Every CLI call that imports torch costs ~3 s, so the bad-input cases that fail before torch is imported are the
cheap majority, and the expensive cases each check several things.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

import graphopt  # noqa: E402
from graphopt.core.errors import InputError, UsageError, VerificationError  # noqa: E402
from graphopt.export import ExportResult, parse_dynamic_spec, parse_input_option, parse_input_spec  # noqa: E402

_SCRIPT = shutil.which("graphopt")
_BASE_CMD = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "graphopt.cli"]


def graphopt_cli(*args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(env_extra or {})
    return subprocess.run([*_BASE_CMD, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=180)


def assert_one_error_line(proc, code=2, prefix="graphopt: error:") -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix) and len(lines[0]) > len(prefix) + 3, proc.stderr
    return lines[0]


def onnx_files(folder: Path) -> list[str]:
    """.onnx files and hidden temporaries (what an atomic save would leave behind), not __pycache__."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if "__pycache__" not in p.parts and (p.suffix in (".onnx", ".data") or p.name.startswith(".")))


# ------------------------------------------------------------------------------------------- module files
CNN_SRC = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),  # eval mode must switch Dropout off
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # non-trivial running statistics, so that eval mode matters for BatchNorm too
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model
'''

TOKENS_SRC = '''
import torch
from torch import nn


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(1000, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        hidden = torch.tanh(self.mix(self.embed(input_ids))) * mask
        pooled = hidden.sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled), hidden


def build():
    return TinyEncoder()
'''

MISC_SRC = '''
import torch
from torch import nn


class Spectrum(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).abs()  # the TorchScript exporter has no ONNX translation for aten::fft_fft


class ScaleUnlessBatched(nn.Module):
    """Python control flow on a shape: the tracer records the branch taken at export time (batch 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[0] > 1:
            return y * 2
        return y


def fft():
    return Spectrum()


def batched():
    return ScaleUnlessBatched()
'''

EMB_SRC = '''
import torch
from torch import nn


class Tagger(nn.Module):
    """A 50-row embedding: the default generated token ids, [0, 1000), run past its end."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens)).mean(1)


def build():
    return Tagger()
'''

PLAIN_SRC = '''
# no torch here: the errors these cause are found without importing it (fast tests)


def not_a_module():
    return 42


def broken():
    raise RuntimeError("checkpoint not found")
'''


def write_sources(folder: Path) -> Path:
    for name, src in (("cnn", CNN_SRC), ("tokens", TOKENS_SRC), ("misc", MISC_SRC), ("plain", PLAIN_SRC),
                      ("emb", EMB_SRC)):
        (folder / f"{name}.py").write_text(textwrap.dedent(src))
    return folder


def load_source(folder: Path, name: str):
    """The module file imported under a unique name, for the torch side of the tests."""
    spec = importlib.util.spec_from_file_location(f"_export_test_{name}_{abs(hash(folder))}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------------------- CLI, success
def test_cli_cnn_dynamic_batch(tmp_path):
    write_sources(tmp_path)
    proc = graphopt_cli("export", "cnn:build", "--input", "image=1x3x16x16", "--dynamic", "image=0",
                        "-o", "cnn.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wrote cnn.onnx" in proc.stdout
    assert "exporting with torch.onnx" in proc.stderr and "check 2/2" in proc.stderr  # progress on stderr
    assert "image=2x3x16x16" in proc.stdout  # the second check doubled the dynamic axis
    assert onnx_files(tmp_path) == ["cnn.onnx"]  # no temporary leftovers

    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["output"]
    assert dims(proto.graph.input[0]) == ["image_dim0", 3, 16, 16]
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 17

    module = load_source(tmp_path, "cnn").build().eval()
    sess = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # batch 3: never seen in export
    with torch.no_grad():
        ref = module(x).numpy()
    (got,) = sess.run(None, {"image": x.numpy()})
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert graphopt.load(tmp_path / "cnn.onnx").input_names() == ["image"]  # graphopt's own checks accept it

    again = graphopt_cli("export", "cnn:build", "--input", "image=1x3x16x16", "-o", "cnn.onnx", "-q", cwd=tmp_path)
    assert "already exists" in assert_one_error_line(again)


def test_cli_token_ids_and_mask_dynamic_batch_and_sequence(tmp_path):
    write_sources(tmp_path)
    # given mask first: every name is a forward() parameter, so they are bound by name, in forward()'s order
    proc = graphopt_cli("export", "tokens:build", "--input", "attention_mask=2x8:int64",
                        "--input", "input_ids=2x8:int64", "--dynamic", "input_ids=0", "--dynamic", "input_ids=1",
                        "--dynamic", "attention_mask=0", "--dynamic", "attention_mask=-1",
                        "--output-name", "logits", "--output-name", "hidden", "-o", "enc.onnx", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # -q: no progress
    assert "input_ids=4x16, attention_mask=4x16" in proc.stdout

    proto = onnx.load(str(tmp_path / "enc.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in proto.graph.input)
    assert dims(proto.graph.input[0]) == ["input_ids_dim0", "input_ids_dim1"]
    assert dims(proto.graph.input[1]) == ["attention_mask_dim0", "attention_mask_dim1"]
    assert [o.name for o in proto.graph.output] == ["logits", "hidden"]

    module = load_source(tmp_path, "tokens").build().eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        ref_logits, ref_hidden = module(ids, mask)
    sess = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    logits, hidden = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert logits.shape == (3, 3) and hidden.shape == (3, 5, 16)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hidden, ref_hidden.numpy(), rtol=1e-4, atol=1e-5)
    assert np.all(hidden[2, 1:] == 0)  # the mask really reaches the mask input


# ------------------------------------------------------------------------------------------- CLI, bad input
FAKE_TORCH = "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"


BAD_CLI_CASES = [
    (["nosuch:build", "--input", "x=1x4"], "no module named 'nosuch'"),
    (["plain:nosuch", "--input", "x=1x4"], "'plain' has no attribute 'nosuch' (it defines: not_a_module, broken)"),
    (["plain:not_a_module", "--input", "x=1x4"], "plain:not_a_module() returned an int (42), not a torch.nn.Module"),
    (["plain:broken", "--input", "x=1x4"], "calling plain:broken() failed: RuntimeError: checkpoint not found"),
    (["misc:fft", "--input", "x=2x8"], "torch.onnx.export failed: UnsupportedOperatorError: Exporting the operator "
                                       "'aten::fft_fft'"),
    (["misc", "--input", "x=1x4"], "expected MODULE:CALLABLE"),
    (["cnn:build", "--input", "image=1x3x0x8"], "every dim must be at least 1"),
    (["cnn:build", "--input", "image"], "expected NAME=SHAPE[:DTYPE[:LOW..HIGH]]"),
    (["cnn:build", "--input", "image=1x3x8x8:int65"], "unknown dtype 'int65'"),
    (["cnn:build", "--input", "image=1x3x8x8", "--input", "image=1x3x8x8"], "given twice"),
    (["cnn:build", "--input", "image=1x3x8x8", "--dynamic", "img=0"], "no input is named 'img'"),
    (["cnn:build", "--input", "image=1x3x8x8", "--dynamic", "image=4"], "axis out of range"),
    (["cnn:build", "--input", "image=1x3x8x8", "--dynamic", "image=batch"], "expected NAME=AXIS"),
    (["cnn:build", "--input", "image=1x3x8x8", "--missing-torch"], "pip install graphopt[torch]"),
    (["emb:build", "--input", "tokens=2x7:int64:5..5"], "LOW < HIGH"),
    (["emb:build", "--input", "tokens=2x7:int64:0.5..3"], "whole-number range"),
    (["emb:build", "--input", "tokens=2x7:uint8:0..300"], "does not fit uint8"),
    (["emb:build", "--input", "tokens=2x7:bool:0..2"], "bool input takes no value range"),
    (["emb:build"], "give the module's inputs with --input"),
    (["emb:build", "--example", "missing.npz"], "missing.npz: no such file"),
    (["emb:build", "--example", "emb.py"], "--example takes an .npz"),
    (["emb:build", "--example", "text.npz"], "is not an .npz file"),
    (["emb:build", "--example", "ex.npz", "--input", "tokens=2x7:int64"], "ex.npz already gives it"),
    (["emb:build", "--example", "ex.npz", "--dynamic", "tokens=2"], "axis out of range"),
]
BAD_CLI_IDS = ["no-module", "no-attribute", "not-a-module", "build-raises", "export-fails", "no-colon", "zero-dim",
               "no-shape", "bad-dtype", "duplicate-input", "dynamic-unknown-input", "dynamic-axis-out-of-range",
               "dynamic-not-int", "missing-torch", "range-empty", "range-fraction-for-int", "range-past-dtype",
               "range-bool", "no-inputs", "example-missing", "example-not-npz-name", "example-not-npz-content",
               "example-and-input-same-name", "example-dynamic-axis-out-of-range"]
assert len(BAD_CLI_CASES) == len(BAD_CLI_IDS) == len(set(BAD_CLI_IDS))


@pytest.fixture(scope="module")
def bad_cli_runs(tmp_path_factory):
    """Every bad-input case's real CLI run, each in its own folder, several at once: each call is a separate
    process that spends its time in interpreter start-up, so running them side by side checks exactly what one at
    a time did, in less wall time. Returns {case id: (folder, CompletedProcess or the exception it raised)}."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case_id, args):
        folder = tmp_path_factory.mktemp(f"bad_{case_id}")
        write_sources(folder)
        np.savez(folder / "ex.npz", tokens=np.zeros((2, 7), np.int64))
        (folder / "text.npz").write_text("tokens\n1 2 3\n")
        env = None
        if "--missing-torch" in args:  # a `torch` that fails to import, ahead of the real one on the path
            args = [a for a in args if a != "--missing-torch"]
            (folder / "fake" / "torch").mkdir(parents=True)
            (folder / "fake" / "torch" / "__init__.py").write_text(FAKE_TORCH)
            env = {"PYTHONPATH": str(folder / "fake")}
        try:
            return folder, graphopt_cli("export", *args, "-o", "out.onnx", "-q", cwd=folder, env_extra=env)
        except Exception as exc:  # re-raised by the case's own test
            return folder, exc

    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 2) + 1)) as pool:
        futures = {cid: pool.submit(one, cid, args) for cid, (args, _) in zip(BAD_CLI_IDS, BAD_CLI_CASES)}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case", BAD_CLI_IDS)
def test_cli_bad_input_one_line_exit_2_nothing_written(bad_cli_runs, case):
    expected = BAD_CLI_CASES[BAD_CLI_IDS.index(case)][1]
    folder, proc = bad_cli_runs[case]
    if isinstance(proc, Exception):
        raise proc
    line = assert_one_error_line(proc, 2)
    assert expected in line, line
    assert onnx_files(folder) == []


def test_cli_output_folder_is_refused_even_with_overwrite(tmp_path):
    write_sources(tmp_path)
    (tmp_path / "out.onnx").mkdir()
    proc = graphopt_cli("export", "plain:broken", "--input", "x=1x4", "-o", "out.onnx", "--overwrite", "-q",
                        cwd=tmp_path)
    assert "is a folder" in assert_one_error_line(proc, 2)  # before the module is even imported


def test_cli_embedding_index_error_names_the_input_to_give(tmp_path):
    """Generated token ids [0, 1000) overrun a 50-row embedding: torch's IndexError, with the way out."""
    write_sources(tmp_path)
    proc = graphopt_cli("export", "emb:build", "--input", "tokens=2x7:int64", "-o", "e.onnx", "-q", cwd=tmp_path)
    line = assert_one_error_line(proc, 2)
    assert "IndexError: index out of range" in line
    assert "'tokens'" in line and "--input tokens=2x7:int64:0..N" in line and "--example FILE.npz" in line
    assert onnx_files(tmp_path) == []


def test_cli_embedding_with_value_range_and_with_example_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    write_sources(tmp_path)
    ids = np.random.default_rng(1).integers(0, 50, (3, 5)).astype(np.int64)
    np.savez(tmp_path / "ex.npz", tokens=ids)
    # two independent exports (different options, different outputs), run side by side to halve the start-up wait
    with ThreadPoolExecutor(max_workers=2) as pool:
        ranged = pool.submit(graphopt_cli, "export", "emb:build", "--input", "tokens=2x7:int64:0..50", "--dynamic",
                             "tokens=0", "--dynamic", "tokens=1", "-o", "range.onnx", "-q", cwd=tmp_path)
        example = pool.submit(graphopt_cli, "export", "emb:build", "--example", "ex.npz", "--dynamic", "tokens=1",
                              "-o", "ex.onnx", "-q", cwd=tmp_path)
        proc, example = ranged.result(), example.result()
    assert proc.returncode == 0, proc.stderr
    assert "tokens=4x14" in proc.stdout  # the second check: dynamic axes doubled, ids still in range

    proc = example
    assert proc.returncode == 0, proc.stderr
    assert "tokens=3x5" in proc.stdout and "tokens=3x10" in proc.stdout  # the file's values, then repeated

    module = load_source(tmp_path, "emb").build().eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(ids)).numpy()
    for name in ("range.onnx", "ex.onnx"):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"tokens": ids})[0], ref, rtol=1e-4, atol=1e-5)


def test_cli_torch_and_onnxruntime_disagree_exit_1_nothing_written(tmp_path):
    """An honest disagreement: forward() branches on the batch size in Python. Traced at batch 1, the export
    always takes the batch-1 branch, so with the batch doubled onnxruntime computes y where torch computes 2y."""
    write_sources(tmp_path)
    proc = graphopt_cli("export", "misc:batched", "--input", "x=1x4", "--dynamic", "x=0", "-o", "b.onnx", "-q",
                        cwd=tmp_path)
    line = assert_one_error_line(proc, 1, prefix="graphopt: verification failed:")
    assert "check 2 (dynamic axes doubled: x=2x4): output: max abs" in line
    assert "rel L2 0.5 " in line  # ||y - 2y|| / ||2y||
    assert "Converting a tensor to a Python boolean" in line  # the tracer's warning, as the likely cause
    assert "nothing written to b.onnx" in line
    assert onnx_files(tmp_path) == []
    table = proc.stdout  # per-check numbers on stdout: check 1 passed exactly, check 2 did not
    assert "check 1, example inputs: x=1x4" in table and "check 2, dynamic axes doubled: x=2x4" in table


# ------------------------------------------------------------------------------------------- Python API
def test_python_api_export_result(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8))
    x = torch.randn(2, 5, 6)
    seen = []
    result = graphopt.export(module, {"x": x}, tmp_path / "m.onnx", dynamic={"x": [0, 1]}, progress=seen.append)
    assert isinstance(result, ExportResult) and result.passed
    assert result.path == tmp_path / "m.onnx" and result.path.is_file()
    assert isinstance(result.model, graphopt.Model) and result.model.input_names() == ["x"]
    assert [c["check"] for c in result.checks] == ["example inputs", "dynamic axes doubled"]
    assert [c["inputs"] for c in result.checks] == [{"x": [2, 5, 6]}, {"x": [4, 10, 6]}]
    for check in result.checks:
        (out,) = check["outputs"]
        assert check["passed"] and out["passed"] and out["name"] == "output" and out["rel_l2"] < 1e-5
    assert any("check 2/2" in s for s in seen)
    with torch.no_grad():
        ref = module(x).numpy()
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)

    with pytest.raises(InputError, match="already exists"):
        graphopt.export(module, {"x": x}, tmp_path / "m.onnx")
    no_file = graphopt.export(module, {"x": ((1, 3, 6), "float32")})  # generated input, nothing written
    assert no_file.passed and no_file.path is None and [c["check"] for c in no_file.checks] == \
        ["example inputs", "fresh values"]


class _ItemScale(torch.nn.Module):
    """Divides by the input's largest magnitude via .item(): the tracer bakes that number in as a constant."""

    def forward(self, x):
        return x / x.abs().max().item()


def test_python_api_disagreement_raises_and_force_writes(tmp_path):
    path = tmp_path / "item.onnx"
    with pytest.raises(VerificationError) as info:
        graphopt.export(_ItemScale(), {"x": ((2, 8), "float32")}, path)
    assert "check 2 (fresh values: x=2x8): output: max abs" in str(info.value)
    assert info.value.result.passed is False and info.value.result.checks[0]["passed"] is True
    assert not path.exists()

    forced = graphopt.export(_ItemScale(), {"x": ((2, 8), "float32")}, path, force=True)
    assert forced.passed is False and forced.path == path and path.is_file()


def test_python_api_usage_errors():
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(UsageError, match="needs a torch.nn.Module"):
        graphopt.export(lambda x: x, {"x": ((1, 3), "float32")})
    with pytest.raises(UsageError, match="axis out of range"):
        graphopt.export(lin, {"x": ((1, 3), "float32")}, dynamic={"x": 2})
    with pytest.raises(UsageError, match="no input is named 'y'"):
        graphopt.export(lin, {"x": ((1, 3), "float32")}, dynamic={"y": 0})
    with pytest.raises(UsageError, match="2 output names"):
        graphopt.export(lin, {"x": ((1, 3), "float32")}, output_names=["a", "b"])
    with pytest.raises(InputError, match="torch could not run the module"):
        graphopt.export(lin, {"x": ((1, 4), "float32")})


def test_python_api_value_ranges_and_arrays():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Embedding(50, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(InputError, match=r"'x' held token ids in \[0, 1000\)"):
        graphopt.export(module, {"x": ((2, 3), "int64")})
    assert graphopt.export(module, {"x": ((2, 3), "int64", (0, 50))}).passed
    assert graphopt.export(module, {"x": np.full((2, 3), 49, np.int64)}).passed  # a numpy array as it is
    with pytest.raises(UsageError, match="LOW < HIGH"):
        graphopt.export(module, {"x": ((2, 3), "int64", (3, 1))})


def test_parsers_and_generated_masks():
    assert parse_input_spec("image=1x3x224x224") == ("image", (1, 3, 224, 224), "float32")
    assert parse_input_option("tokens=2x7:int64:0..50") == ("tokens", (2, 7), "int64", (0, 50))
    assert parse_input_option("x=2x3:float32:-0.5..0.5") == ("x", (2, 3), "float32", (-0.5, 0.5))
    assert parse_input_option("x=2x3")[3] is None
    assert parse_input_spec("input_ids=1x128:int64") == ("input_ids", (1, 128), "int64")
    assert parse_input_spec("m=2x4:fp16") == ("m", (2, 4), "float16")
    assert parse_dynamic_spec("image=-1") == ("image", -1)
    from graphopt.export import _Input, _input_sets

    specs = [_Input("input_ids", (2, 8), "int64"), _Input("attention_mask", (2, 8), "int64")]
    first, second = _input_sets(torch, specs, {"input_ids": [0, 1], "attention_mask": [0, 1]}, seed=0)
    assert first["attention_mask"].eq(1).all()
    ids = second["input_ids"]
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 1000
    mask = second["attention_mask"]
    assert mask.shape == (4, 16) and mask[:, 0].eq(1).all()  # every row keeps a token
    zeros = (mask == 0).sum(1).tolist()
    assert all(z >= 1 for z in zeros) and len(set(zeros)) > 1  # padding at the end, different per row
    assert all(mask[r, 16 - z:].eq(0).all() for r, z in enumerate(zeros))
    ranged = [_Input("tokens", (4, 6), "int64", value_range=(3, 9)), _Input("x", (500,), "float32",
                                                                            value_range=(-1.0, 2.0))]
    for feed in _input_sets(torch, ranged, {"tokens": [1]}, seed=0):
        assert 3 <= feed["tokens"].min() and feed["tokens"].max() < 9
        assert -1.0 <= feed["x"].min() and feed["x"].max() < 2.0 and feed["x"].std() > 0.5


def test_import_graphopt_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import graphopt\n"
            "try:\n"
            "    graphopt.export(None, {'x': ((1, 2), 'float32')})\n"
            "except graphopt.UsageError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install graphopt[torch]" in proc.stdout
