"""graphopt's own passes as benchmark contenders (registered when bench.contenders is imported)."""

from __future__ import annotations

import time
from pathlib import Path

import graphopt
from graphopt.core.calibration import InputSet
from graphopt.passes import Context, create

from .contenders import Feed, Optimized, contender


def split_feeds(feeds: list[Feed], searches: bool) -> InputSet:
    """The contender's InputSet. A contender that searches among candidates (qdq's accuracy targets judge them on
    `ctx.inputs.for_selection`) fits on the first 3/4 of the calibration feeds and selects on the last 1/4, never
    both on the same feed; one that does not search fits on all of them. Verification is a few fit feeds: the
    contenders call pass.run directly, the pipeline's verification never runs, and the harness scores every
    contender on its own evaluation set."""
    feeds = list(feeds)
    if not searches:
        return InputSet(fit=feeds, selection=[], verification=feeds[:2])
    if len(feeds) < 2:
        raise ValueError("a searching contender needs at least 2 calibration feeds (fit and selection)")
    n_sel = max(1, len(feeds) // 4)
    fit, selection = feeds[:-n_sel], feeds[-n_sel:]
    return InputSet(fit=fit, selection=selection, verification=fit[:2])


def _rows(feeds: list[Feed]) -> int:
    return sum(len(next(iter(f.values()))) for f in feeds)


def _qdq(params: dict) -> callable:
    def build(fp32_path: Path, feeds: list[Feed], workdir: Path) -> Optimized:
        t0 = time.perf_counter()
        model = graphopt.load(fp32_path)
        inputs = split_feeds(feeds, "min_agreement" in params or "max_error" in params)
        ctx = Context(inputs=inputs)
        for name in graphopt.DEFAULT_RECIPE:  # exact cleanup first (BatchNorm folding)
            model = create(name).run(model, ctx).model
        result = create("qdq", params).run(model, ctx)
        out = Path(workdir) / "model.onnx"
        result.model.save(out, overwrite=True)
        c = result.counters
        int4 = f", {c['int4']} int4 ({c['int4_fused']} as MatMulNBits/GatherBlockQuantized)" if c["int4"] else ""
        note = (f"{c['sites']} sites: {c['int8']} static int8, {c['int8_dynamic']} dynamic int8 ({c['fused']} int8 "
                f"fused){int4}, {c['fp32']} float; predicted distortion {c['predicted_distortion']}, measured "
                f"{c['measured_distortion']}")
        if inputs.selection:
            note += (f"; fit on {len(inputs.fit)} feeds ({_rows(inputs.fit)} rows), target judged on "
                     f"{len(inputs.selection)} other feeds ({_rows(inputs.selection)} rows) of the calibration data")
        return Optimized(out, time.perf_counter() - t0, note)
    return build


QDQ_VARIANTS = {  # name: (parameters, what it is)
    "graphopt_qdq": ({}, "graphopt qdq at its defaults: the menu per site (float / static int8 / dynamic int8 / int4), "
                         "at most 10 % slower than the faster all-int8 form"),
    "graphopt_qdq_all_int8": ({"latency_slack": 0.0}, "graphopt qdq, every site in the faster all-int8 form (static "
                                                      "or dynamic, measured; latency_slack=0)"),
    "graphopt_qdq_gptq": ({"rounding": "gptq"}, "graphopt qdq at its defaults with GPTQ rounding (rounding=gptq)"),
    "graphopt_qdq_gptq_all_int8": ({"rounding": "gptq", "latency_slack": 0.0},
                                   "graphopt qdq, all-int8 with GPTQ rounding (rounding=gptq, latency_slack=0)"),
    "graphopt_qdq_slack25": ({"latency_slack": 0.25}, "graphopt qdq, budget: at most 25 % slower than all-int8"),
    "graphopt_qdq_slack50": ({"latency_slack": 0.5}, "graphopt qdq, budget: at most 50 % slower than all-int8"),
    "graphopt_qdq_gptq_slack25": ({"rounding": "gptq", "latency_slack": 0.25},
                                  "graphopt qdq, GPTQ rounding, at most 25 % slower than all-int8"),
    "graphopt_qdq_all_int8_nobc": ({"latency_slack": 0.0, "bias_correction": False},
                                   "graphopt qdq, all-int8, bias correction off (latency_slack=0, "
                                   "bias_correction=false)"),
    "graphopt_qdq_agree90": ({"min_agreement": 0.9}, "graphopt qdq, accuracy target: the cheapest assignment whose "
                                                     "top-1 agreement with fp32 on the selection feeds is at least "
                                                     "90 % (min_agreement=0.9)"),
    "graphopt_qdq_static": ({"activations": "static"}, "graphopt qdq restricted to static int8 (activations=static)"),
    "graphopt_qdq_dynamic": ({"activations": "dynamic", "latency_slack": 0.0},
                             "graphopt qdq restricted to dynamic int8 MatMuls, no float sites (activations=dynamic, "
                             "latency_slack=0)"),
    "graphopt_qdq_int4_size5x": ({"max_size_mb": 18.0}, "graphopt qdq under max_size_mb=18 (MiniLM fp32 / 5): the "
                                                        "menu per site, int4 as MatMulNBits (accuracy level 4) and "
                                                        "GatherBlockQuantized, block 32"),
    "graphopt_qdq_int4_size5x_gptq": ({"max_size_mb": 18.0, "rounding": "gptq"},
                                      "as graphopt_qdq_int4_size5x with GPTQ rounding"),
    "graphopt_qdq_int4_size14": ({"max_size_mb": 14.4}, "graphopt qdq under max_size_mb=14.4 (about the size of "
                                                        "onnxruntime's all-int4 ort_nbits_rtn)"),
    "graphopt_qdq_int4_size14_gptq": ({"max_size_mb": 14.4, "rounding": "gptq"},
                                      "as graphopt_qdq_int4_size14 with GPTQ rounding"),
}
for _name, (_params, _doc) in QDQ_VARIANTS.items():
    _fn = _qdq(_params)
    _fn.__doc__ = _doc
    contender(_name)(_fn)

QDQ_CONTENDERS = ("graphopt_qdq_all_int8", "graphopt_qdq", "graphopt_qdq_slack25", "graphopt_qdq_slack50")
