"""Small models for tests: hand-built with onnx.helper, or exported from torch (random weights: structure only)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def make(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = ir_version
    return model


def fvi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def bn_inits(prefix: str, c: int, rng: np.random.Generator | int = 0):
    """BatchNormalization parameters drawn from `rng` (a Generator, or a seed): the same for a given seed,
    whichever tests ran before."""
    rng = np.random.default_rng(rng)
    return [init(f"{prefix}_g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{prefix}_b", rng.uniform(-1, 1, c).astype(np.float32)),
            init(f"{prefix}_m", rng.uniform(-1, 1, c).astype(np.float32)),
            init(f"{prefix}_v", rng.uniform(0.5, 2, c).astype(np.float32))]


def bn_node(prefix: str, x: str, y: str, eps: float = 1e-5):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=eps)


def fashion_split(n_fit: int = 128, n_selection: int = 128, seed: int = 0):
    """The 512 bundled Fashion-MNIST images (examples/fashion_test.npz), cut by image into three disjoint parts:
    fit and selection, which passes may read, and the held-out rest, which no pass reads (the InputSet's
    verification part). Returns (InputSet of one-image feeds, held-out images, held-out labels): score a pass's
    result on the held-out images only."""
    from graphopt.core.calibration import InputSet

    images = np.load(EXAMPLES / "fashion_test.npz")["image"]
    labels = np.load(EXAMPLES / "fashion_test_labels.npy")
    order = np.random.default_rng(seed).permutation(len(images))
    fit, selection, held = np.split(order, [n_fit, n_fit + n_selection])
    assert len(held) >= 128, "too few held-out images to score on"

    def feeds(idx):
        return [{"image": images[i:i + 1]} for i in idx]

    inputs = InputSet(fit=feeds(fit), selection=feeds(selection), verification=feeds(held))
    return inputs, images[held], labels[held]


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def torch_export(module, args, input_names, output_names, dynamic_axes=None, opset=17) -> onnx.ModelProto:
    """Legacy torch exporter without constant folding, so BatchNormalization and Dropout stay in the graph."""
    import torch

    buf = io.BytesIO()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buf.getvalue())


def randomize_batchnorm(module) -> None:
    """Give BN layers non-trivial statistics so folding them is really exercised."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 2 - 1)


def resnet_like():
    """A torchvision-style residual CNN: conv-BN-ReLU stem, basic blocks with a 1x1 projection shortcut."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layer1 = Block(16, 16, 1)
            self.layer2 = Block(16, 32, 2)
            self.drop = nn.Dropout(0.3)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(self.stem(x)))
            return self.fc(self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    torch.manual_seed(0)
    net = Net()
    randomize_batchnorm(net)
    return net


def bert_like(vocab=100, hidden=32, heads=4, layers=2):
    """A BERT-style encoder: embeddings + LayerNorm, self-attention with a mask, GELU MLP, dropout, pooling."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.ff1, self.ff2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
            self.drop = nn.Dropout(0.1)

        def split(self, x):
            b, s, _ = x.shape
            return x.view(b, s, heads, hidden // heads).transpose(1, 2)

        def forward(self, x, bias):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias, dim=-1)
            ctx = (self.drop(att) @ v).transpose(1, 2).reshape(x.shape)
            x = self.ln1(x + self.drop(self.o(ctx)))
            return self.ln2(x + self.drop(self.ff2(nn.functional.gelu(self.ff1(x)))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(64, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids, attention_mask):
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            x = self.ln(self.tok(input_ids) + self.pos(pos))
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            for layer in self.layers:
                x = layer(x, bias)
            m = attention_mask.unsqueeze(-1).float()
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, dim=-1)

    torch.manual_seed(0)
    return Encoder()
