#!/usr/bin/env python
"""Train, once, the fixed linear probe the benchmark uses to judge MiniLM embeddings.

    python tools/bench/probe.py [--train 4000] [--test 2000]

Embeds WordNet noun glosses with the fp32 MiniLM ONNX model (exported by graphopt.export into build/bench/minilm,
the same file the benchmark's fp32 contender is), fits a multinomial logistic regression (scikit-learn; C chosen
by 5-fold cross-validation on the train split only) on 4000 "train" glosses to predict the 26 noun supersenses,
reports its accuracy on 2000 "test" glosses and saves W [384, 26], b [26] to tools/bench/minilm_probe.npz.
The benchmark then applies this fixed probe, argmax(X W + b), to every contender's embeddings of the test glosses.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
for _p in (str(_REPO), str(_REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench import datasets, metrics  # noqa: E402
from bench.harness import CACHE, log  # noqa: E402
from bench.tasks import PROBE_PATH, exported, minilm_feeds  # noqa: E402

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def embed(session, texts: list[str], batch: int = 64) -> np.ndarray:
    return np.concatenate([session.run(["embedding"], feed)[0] for feed in minilm_feeds(texts, batch)], axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=PROBE_PATH)
    args = p.parse_args(argv)

    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from graphopt.core.runtime import RuntimeSettings, session_options

    path, _ = exported("minilm", CACHE / "minilm", rebuild=False)
    session = ort.InferenceSession(str(path), session_options(RuntimeSettings(intra_op_threads=args.threads)),
                                   providers=["CPUExecutionProvider"])
    train_x, train_y = datasets.wordnet_glosses("train", args.train)
    test_x, test_y = datasets.wordnet_glosses("test", args.test)
    t0 = time.perf_counter()
    xtr, xte = embed(session, train_x), embed(session, test_x)
    log(f"embedded {len(xtr)} + {len(xte)} glosses in {time.perf_counter() - t0:.1f}s")

    # noun.Tops (lex_filenum 3) holds 51 of ~82k glosses: a class with fewer members than folds is expected here
    warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=5000)
        cv[c] = float(np.mean(cross_val_score(clf, xtr, train_y, cv=folds)))
        log(f"C={c:g}: 5-fold CV accuracy on train {cv[c]:.4f}")
    best = max(C_GRID, key=lambda c: (cv[c], -c))
    clf = LogisticRegression(C=best, max_iter=5000).fit(xtr, train_y)

    # the probe as a fixed numpy head over all 26 classes (a class absent from train gets -inf: never predicted)
    weight = np.zeros((xtr.shape[1], datasets.NOUN_SUPERSENSES), np.float64)
    bias = np.full(datasets.NOUN_SUPERSENSES, -np.inf, np.float64)
    weight[:, clf.classes_] = clf.coef_.T
    bias[clf.classes_] = clf.intercept_
    acc = metrics.probe_accuracy(xte, test_y, weight, bias)
    if abs(acc - clf.score(xte, test_y)) > 1e-9:
        raise RuntimeError("numpy probe disagrees with scikit-learn")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".tmp.npz")
    np.savez(tmp, weight=weight, bias=bias, C=np.float64(best), train=np.int64(args.train),
             test=np.int64(args.test), test_accuracy=np.float64(acc),
             cv_accuracy=np.float64(cv[best]))
    tmp.replace(args.out)
    print(f"probe: C={best:g} (5-fold CV on train {cv[best]:.2%}); test accuracy on {len(test_y)} glosses: "
          f"{acc:.2%}; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
