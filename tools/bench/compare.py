#!/usr/bin/env python
"""Compare two benchmark tables (reproducibility check): metrics must be identical, latencies within noise.

    python tools/bench/compare.py tools/bench/RESULTS.md /tmp/RESULTS.again.md

For every model section and contender present in both files, prints the metric cells that differ (exit 1 if any)
and the relative difference of the latency median and p90 (at each timed batch size) between the two runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

TIMING = {"latency median (ms)", "p90 (ms)", "speed-up", "opt. time (s)"}
IGNORED = {"notes"}


def is_timing(column: str) -> bool:
    """Timing columns, including the per-batch ones (`latency b16 (ms)`, `p90 b1 (ms)`, `speed-up b16`)."""
    return column in TIMING or column.startswith(("latency b", "p90 b", "speed-up b"))


def _latency_columns(row: dict[str, str]) -> list[str]:
    return [c for c in row if c in ("latency median (ms)", "p90 (ms)") or c.startswith(("latency b", "p90 b"))]


def tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{section title: {contender: {column: cell}}} from the markdown the harness writes."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    section = ""
    headers: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.lstrip("#").strip()
            headers = None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if headers is None:
                headers = cells
            elif not set(line) <= set("|-: "):
                out.setdefault(section, {})[cells[0].strip("`")] = dict(zip(headers, cells))
        else:
            headers = None
    return out


def _num(cell: str) -> float | None:
    try:
        return float(cell.rstrip("×%").replace(",", ""))
    except ValueError:
        return None


def compare(a: str, b: str) -> tuple[list[str], list[str]]:
    ta, tb = tables(a), tables(b)
    differences, timings = [], []
    for section in ta:
        if section not in tb:
            continue
        for name, row in ta[section].items():
            other = tb[section].get(name)
            if other is None:
                continue
            for col, cell in row.items():
                if is_timing(col) or col in IGNORED:
                    continue
                if other.get(col) != cell:
                    differences.append(f"{section} / {name} / {col}: {cell} vs {other.get(col)}")
            parts = []
            for col in _latency_columns(row):
                x, y = _num(row.get(col, "")), _num(other.get(col, ""))
                if x and y:
                    parts.append(f"{col.split(' (')[0]} {x:.3f} vs {y:.3f} ({(y - x) / x:+.1%})")
            if parts:
                timings.append(f"{section} / {name}: " + "; ".join(parts))
    return differences, timings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    differences, timings = compare(Path(argv[0]).read_text(), Path(argv[1]).read_text())
    for line in timings:
        print(line)
    if differences:
        print("METRICS DIFFER:")
        for line in differences:
            print("  " + line)
        return 1
    print("metrics identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
