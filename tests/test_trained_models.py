"""The project's own trained reference models: checkpoints load strictly, the ResNet is accurate, the DiT exports
to ONNX with a dynamic batch and the numpy sampler gives the same samples through ORT and torch."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from models import dit, dit_sampler, fashion_resnet  # noqa: E402

# measured: 0.930 on the first 1000 test images (0.9199 on all 10k, models/weights/README.md); minus a margin
RESNET_MIN_ACC_1K = 0.90


@pytest.fixture(scope="module")
def dit_model():
    torch.set_num_threads(2)
    return dit.build()


@pytest.fixture(scope="module")
def dit_onnx(dit_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit.onnx"
    spec = dit.EXPORT
    args = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["inputs"].values())
    dynamic = {name: {ax: "batch" for ax in axes} for name, axes in spec["dynamic"].items()}
    dynamic["eps"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dit_model, args, str(path), dynamo=False, opset_version=17,
                          input_names=list(spec["inputs"]), output_names=spec["outputs"], dynamic_axes=dynamic)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _raw_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoints_load_strictly():
    for module, cls in ((fashion_resnet, fashion_resnet.FashionResNet), (dit, dit.DiT)):
        state = _raw_state(module.WEIGHTS)
        model = cls()
        result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                       strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert module.WEIGHTS.stat().st_size < 10 * 1024 * 1024
        built = module.build()
        assert not built.training
        assert all(p.dtype == torch.float32 for p in built.parameters())


def test_resnet_accuracy_first_1000():
    from bench.datasets import MaterialMissing, fashion_mnist, fashion_normalize

    try:
        images, labels = fashion_mnist("test")
    except MaterialMissing as exc:  # data set not installed on this machine; any other error fails the test
        pytest.skip(str(exc))
    torch.set_num_threads(2)
    model = fashion_resnet.build()
    with torch.no_grad():
        pred = model(torch.from_numpy(fashion_normalize(images[:1000]))).argmax(1).numpy()
    acc = float((pred == labels[:1000]).mean())
    assert acc >= RESNET_MIN_ACC_1K, acc


def test_dit_forward_shapes(dit_model):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 9, dit.NULL_CLASS])
    with torch.no_grad():
        eps_f = dit_model(x, torch.tensor([0.0, 500.0, 999.0]), y)
        eps_i = dit_model(x, torch.tensor([0, 500, 999]), y)
    assert eps_f.shape == (3, 1, 28, 28) and eps_f.dtype == torch.float32
    torch.testing.assert_close(eps_f, eps_i)
    assert torch.isfinite(eps_f).all() and eps_f.abs().max() > 0     # trained: not the adaLN-Zero start


def test_dit_out_of_range_label_is_null_class(dit_model):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 300.0)
    with torch.no_grad():
        odd = dit_model(x, t, torch.tensor([-1, 11, 999, dit.NULL_CLASS]))
        null = dit_model(x, t, torch.full((4,), dit.NULL_CLASS))
        cond = dit_model(x, t, torch.tensor([3, 3, 3, 3]))
    torch.testing.assert_close(odd, null)
    assert not torch.allclose(cond, null)                               # the class does condition the output


def test_graphopt_export_contract():
    """`graphopt export models.X:build` with each module's EXPORT spec: torch and ORT agree at two batch sizes."""
    import graphopt  # the package under test: if it, or its export, is missing, that is a failure, not a skip

    for module in (fashion_resnet, dit):
        spec = module.EXPORT
        result = graphopt.export(module.build(), spec["inputs"], None, dynamic=spec["dynamic"],
                                 output_names=spec["outputs"])
        assert result.passed
        assert [i.name for i in result.model.graph.input] == list(spec["inputs"])


def test_resnet_onnx_dynamic_batch(tmp_path):
    model = fashion_resnet.build()
    path = tmp_path / "resnet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_onnx_matches_torch(dit_model, dit_onnx, batch):
    assert dit_onnx.get_inputs()[0].shape[0] == "batch"
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.float32)
    y = rng.integers(0, 11, batch).astype(np.int64)
    got = dit_onnx.run(["eps"], {"x": x, "t": t, "y": y})[0]
    with torch.no_grad():
        want = dit_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert got.shape == (batch, 1, 28, 28)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_onnx_and_torch_agree(dit_model, dit_onnx):
    """Same seed -> same noise: the ONNX and the torch step functions give the same samples (with guidance, so
    the conditional and null-class halves run as one batch of 2B)."""
    y = np.array([1, 7], np.int64)
    a = dit_sampler.ddim_sample(dit_sampler.onnx_step_fn(dit_onnx), y, steps=10, seed=3, guidance=2.0)
    b = dit_sampler.ddim_sample(dit_sampler.torch_step_fn(dit_model), y, steps=10, seed=3, guidance=2.0)
    assert a.shape == (2, 1, 28, 28) and a.dtype == np.float32
    assert np.all(dit_sampler.relative_error(a, b) < 1e-3)


def test_samplers_are_seeded():
    def fake_step(x, t, y):            # deterministic stand-in predictor; checks the sampler's own plumbing
        return (0.1 * x + 0.001 * t[:, None, None, None] + 0.01 * y[:, None, None, None]).astype(np.float32)

    y = np.array([0, 3, 10])
    a = dit_sampler.ddpm_sample(fake_step, y, steps=20, seed=5)
    b = dit_sampler.ddpm_sample(fake_step, y, steps=20, seed=5)
    c = dit_sampler.ddpm_sample(fake_step, y, steps=20, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.isfinite(a)) and a.dtype == np.float32
    for guidance in (1.0, 3.0):
        d1 = dit_sampler.ddim_sample(fake_step, y, steps=20, seed=5, guidance=guidance)
        d2 = dit_sampler.ddim_sample(fake_step, y, steps=20, seed=5, guidance=guidance)
        d3 = dit_sampler.ddim_sample(fake_step, y, steps=20, seed=6, guidance=guidance)
        assert d1.shape == (3, 1, 28, 28)
        np.testing.assert_array_equal(d1, d2)
        assert np.all(dit_sampler.relative_error(d3, d1) > 1e-2)


def test_timesteps():
    ts = dit_sampler.timesteps(50)
    assert ts[0] == 999 and ts[-1] == 0 and len(np.unique(ts)) == 50 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(dit_sampler.timesteps(1000), np.arange(999, -1, -1))
