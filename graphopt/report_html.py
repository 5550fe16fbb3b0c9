"""One self-contained HTML page of a report (the JSON report's data, nothing else): before / after, a search's
measured front as a plot with the chosen point marked (matplotlib, the `plot` extra; a note instead when it is
missing), every candidate, why each family got what it got, each pass's per-site decisions with their figures,
and the verification numbers. No script, no external file: it opens offline and can be mailed."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from .core.files import write_text_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.chosen td{background:#e6f4ea;font-weight:600}tr.front td:first-child{border-left:4px solid #1a73e8}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.dim{color:#777}
details{margin:.4em 0}summary{cursor:pointer}code{font-size:.92em;overflow-wrap:anywhere}
"""


def write_html(report: dict, path: str | Path, title: str = "graphopt report") -> None:
    write_text_atomic(Path(path), render_html(report, title))


def render_html(report: dict, title: str = "graphopt report") -> str:
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>", _verdict(report)]
    parts.append(_before_after(report))
    if report.get("search"):
        parts.append(_search(report["search"]))
    if report.get("verification", {}).get("metrics"):  # a search that chose nothing verified nothing
        parts.append(_verification(report))
    if report.get("passes"):
        parts.append(_passes(report["passes"]))
    m = report.get("machine", {})
    parts.append(f"<p class=dim>graphopt {_e(report.get('graphopt', ''))}; {_e(m.get('cpu', ''))}, "
                 f"{_e(m.get('cores', ''))} cores; onnxruntime {_e(m.get('onnxruntime', ''))}; "
                 f"{_e(report.get('runtime', {}).get('intra_op_threads', ''))} intra-op threads</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt="{:.4g}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def _table(header: list[str], rows: list[list], left: int = 1, row_class: list[str] | None = None) -> str:
    head = "".join(f"<th class={'l' if i < left else 'r'}>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r, cells in enumerate(rows):
        cls = f" class='{row_class[r]}'" if row_class and row_class[r] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td class={'l' if i < left else 'r'}>{c}</td>"
                                           for i, c in enumerate(cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _verdict(report: dict) -> str:
    v = report.get("verification", {})
    if v.get("passed"):
        text = "<span class=ok>verification passed</span>"
    else:
        text = "<span class=bad>verification failed</span>: " + _e("; ".join(v.get("violations", [])))
    lat = report.get("latency", {})
    speed = f"; {lat['speedup']:.2f}x faster" if lat.get("speedup") else ""
    return f"<p>{text}{_e(speed)}</p>"


def _before_after(report: dict) -> str:
    b, a = report["before"], report.get("after") or report["before"]
    lat = report.get("latency", {})
    rows = [["nodes", b["nodes"], a["nodes"]], ["parameters", f"{b['parameters']:,}", f"{a['parameters']:,}"],
            ["size (MB)", f"{b['bytes'] / 1e6:.3f}", f"{a['bytes'] / 1e6:.3f}"]]
    if lat.get("before") and lat.get("after"):
        rows += [["latency median (ms)", f"{lat['before']['median_ms']:.3f}", f"{lat['after']['median_ms']:.3f}"],
                 ["latency p90 (ms)", f"{lat['before']['p90_ms']:.3f}", f"{lat['after']['p90_ms']:.3f}"]]
    ops = sorted(set(b["op_counts"]) | set(a["op_counts"]))
    rows += [[f"&nbsp;&nbsp;{_e(op)}", b["op_counts"].get(op, 0), a["op_counts"].get(op, 0)] for op in ops
             if b["op_counts"].get(op, 0) != a["op_counts"].get(op, 0)]
    shape = lat.get("shape") or {}
    note = ""
    if lat.get("before"):
        note = (f"<p class=dim>latency: onnxruntime at {_e(', '.join(f'{k}={x}' for k, x in shape.items()))}, "
                f"{lat['before']['threads']} intra-op threads, {lat['before']['runs']}+{lat['after']['runs']} runs "
                "interleaved</p>")
    return "<h2>Before / after</h2>" + _table(["", "before", "after"], rows) + note


def _search(s: dict) -> str:
    points = {p["id"]: p for p in s["points"]}
    chosen = s.get("chosen")
    out = [f"<h2>Search</h2><p>Budget: <b>{_e(s['budget_text'])}</b>. Fidelity on the selection samples; the "
           f"front is every measured point that no other beats on both {_e(s['cost_axis'])} and "
           f"{_e(s['loss_axis'])}.</p>"]
    if chosen is not None:
        out.append(f"<p>Chosen: <b>[{chosen}] {_e(points[chosen]['label'])}</b></p>")
    else:
        reach = "; ".join(f"[{i}] {_e(points[i]['label'])}" for i in s.get("best_reachable", []))
        out.append(f"<p class=bad>No candidate met the budget. Best reachable: {reach or 'none measured'}</p>")
    out.append(_plot(s))
    cost = (f"{s['seconds']:.0f} s in all (bound {s['max_minutes']:g} min"
            + ("; the bound stopped it" if s["stopped_by_time"] else "") + "); first point within the budget after "
            + (f"{s['first_valid_seconds']:.0f} s" if s.get("first_valid_seconds") is not None else "none") + "; builds "
            + s["executor"])
    out.append(f"<p class=dim>Search cost: {_e(cost)}.</p>")
    rows, classes = [], []
    for p in s["points"]:
        sel = p.get("selection") or {}
        figures = [_num(p["speedup"], "{:.2f}x"), _num(p["latency_ms"], "{:.3f}"), _num(p["size_mb"], "{:.2f}"),
                   _num(sel.get("cosine"), "{:.4f}"), _num(sel.get("agreement"), "{:.2%}"),
                   _num(sel.get("accuracy"), "{:.2f}%"), _num(p["loss"])]
        verdict = ("<span class=ok>yes</span>" if p["meets_cost"] and p["meets_floor"] else
                   _e("; ".join(p["cost_violations"] + p["floor_violations"]) or p["reason"] or p["status"]))
        rows.append([f"{p['id']}", f"<code>{_e(p['label'])}</code>", _e(p["stage"]), *figures, verdict,
                     "yes" if p["on_front"] else "", ("cached" if p["cached"] else _num(p["build_seconds"], "{:.1f}"))])
        classes.append("chosen" if p["id"] == chosen else ("front" if p["on_front"] else ""))
    out.append(_table(["#", "recipe", "stage", "speed-up", "latency (ms)", "size (MB)", "cosine", "agreement",
                       "accuracy", s["loss_axis"], "within budget", "front", "build (s)"], rows, left=3,
                      row_class=classes))
    out.append("<h3>Why each family got what it got</h3><ul>"
               + "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in s["families"].items()) + "</ul>")
    for note in s.get("notes", []):
        out.append(f"<p class=dim>{_e(note)}</p>")
    return "\n".join(out)


def front_png(s: dict) -> bytes | None:
    """The measured points and the front, the chosen point marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    size_axis = s["cost_axis"] == "size (MB)"
    measured = [p for p in s["points"] if p["status"] == "measured" and p["loss"] is not None]
    x = (lambda p: p["size_mb"]) if size_axis else (lambda p: p["speedup"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter([x(p) for p in measured], [p["loss"] for p in measured], c="#999", s=22, label="measured")
    front = sorted((p for p in measured if p["on_front"]), key=x)
    ax.plot([x(p) for p in front], [p["loss"] for p in front], "-o", c="#1a73e8", ms=5, label="front")
    for p in measured:
        ax.annotate(str(p["id"]), (x(p), p["loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = next((p for p in measured if p["id"] == s.get("chosen")), None)
    if chosen:
        ax.scatter([x(chosen)], [chosen["loss"]], marker="*", s=260, c="#d93025", zorder=5, label="chosen")
    ax.axhline(s["loss_floor"], ls="--", c="#d93025", lw=0.8, label="fidelity floor")
    budget = s["budget"]
    target = budget.get("max_size_mb") if size_axis else budget.get("target_speedup")
    if target:
        ax.axvline(target, ls=":", c="#137333", lw=0.9, label="budget")
    ax.set_xlabel(s["cost_axis"] + (" (lower is better)" if size_axis else " (higher is better)"))
    ax.set_ylabel(s["loss_axis"] + " (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot(s: dict) -> str:
    png = front_png(s)
    if png is None:
        return "<p class=dim>(the front plot needs matplotlib: pip install 'graphopt[plot]')</p>"
    return (f"<img alt='measured front' src='data:image/png;base64,{base64.b64encode(png).decode()}' "
            "style='max-width:100%'>")


def _verification(report: dict) -> str:
    v, i = report.get("verification", {}), report.get("inputs", {})
    rows = [[_e(m["name"]), _num(m["max_abs"], "{:.3g}"), _num(m["mean_abs"], "{:.3g}"), _num(m["rel_l2"], "{:.3g}"),
             _num(m["cosine"], "{:.6f}"), _num(m["top1_agreement"], "{:.2%}"), m["nonfinite_new"]]
            for m in v.get("metrics", [])]
    out = [f"<h2>Verification</h2><p>{i.get('verification_samples')} verification samples that no pass and no "
           f"search read ({i.get('fit_samples')} fit, {i.get('selection_samples')} selection); second size: "
           f"{_e(i.get('second_size', 'none'))}. Bound: {_e(_bound(report.get('tolerance', {})))}.</p>",
           _table(["output", "max abs", "mean abs", "rel L2", "cosine", "top-1 agree", "new NaN/Inf"], rows)]
    acc = report.get("accuracy")
    if acc:
        out.append(f"<p>Top-1 accuracy against the labels of {acc['samples']} verification rows: original "
                   f"{acc['original']:.2f} %, optimized {acc['optimized']:.2f} % ({-acc['drop']:+.2f} points).</p>")
    for w in report.get("warnings", []):
        out.append(f"<p class=bad>warning: {_e(w)}</p>")
    return "\n".join(out)


def _bound(t: dict) -> str:
    names = {"max_rel_l2": "relative L2 <=", "max_abs": "max abs <=", "min_cosine": "cosine >=",
             "min_top1_agreement": "top-1 agreement >="}
    return ", ".join(f"{names[k]} {v:g}" for k, v in t.items() if v is not None) or "no new NaN/Inf"


def _passes(passes: list[dict]) -> str:
    out = ["<h2>Passes and their decisions</h2>"]
    for p in passes:
        counters = ", ".join(f"{k}={v}" for k, v in p.get("counters", {}).items())
        out.append(f"<h3><code>{_e(p['spec'])}</code>: {_e(p['status'])} in {p['seconds']:.1f} s</h3>")
        if p.get("reason"):
            out.append(f"<p>{_e(p['reason'])}</p>")
        if counters:
            out.append(f"<p class=dim>{_e(counters)}</p>")
        decisions = p.get("decisions", [])
        if decisions:
            rows = [[_e(d["site"]), _e(d["action"]), _e(d["reason"])] for d in decisions]
            out.append(f"<details{' open' if len(decisions) <= 12 else ''}><summary>{len(decisions)} per-site "
                       "decisions</summary>" + _table(["site", "action", "why (the figures behind it)"], rows, left=3)
                       + "</details>")
    return "\n".join(out)
