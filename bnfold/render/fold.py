"""Rich rendering of a FoldReport."""
from __future__ import annotations

from rich.table import Table

from ..report import FoldReport
from . import Output


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_fold(report: FoldReport, out: Output) -> None:
    for w in report.warnings:
        out.warn(w)
    if out.as_json:
        out.json(report)
        return
    con = out.out
    if report.variance:
        t = Table(title="variance corrected m/(m−1)", title_justify="left")
        for col in ("BN", "m", "factor"):
            t.add_column(col)
        for v in report.variance:
            t.add_row(v.bn, str(v.values_per_channel), f"{v.factor:.6g}")
        con.print(t)
    if report.folded:
        t = Table(title=f"folded {len(report.folded)} BatchNormalization{_split_note(report)}", title_justify="left")
        for col in ("BN", "into", "pattern"):
            t.add_column(col)
        for f in report.folded:
            t.add_row(_scoped(f.bn, f.graph) + ("" if f.op == "BatchNormalization" else f" ({f.op})"),
                      f.producer, f.pattern)
        con.print(t)
    if report.skipped:
        t = Table(title=f"kept {len(report.skipped)} BatchNormalization", title_justify="left")
        t.add_column("BN")
        t.add_column("why it was kept")
        for s in report.skipped:
            t.add_row(_scoped(s.bn, s.graph), s.reason)
        con.print(t)
    if report.rewritten:
        t = Table(title=f"rewrote {len(report.rewritten)} BatchNormalization as Mul+Add", title_justify="left")
        t.add_column("BN")
        t.add_column("why it could not fold")
        for r in report.rewritten:
            t.add_row(_scoped(r.bn, r.graph), r.reason)
        con.print(t)
    if not report.folded and not report.skipped and not report.rewritten:
        con.print("no BatchNormalization found")
    for note in report.notes:
        con.print(f"[dim]note:[/] {note}")
    con.print(
        f"nodes {report.nodes_before} → {report.nodes_after}, BN {report.bn_before} → {report.bn_after}, "
        f"size {_size(report.size_before)} → {_size(report.size_after)}, {report.seconds:.2f} s"
    )
    if report.output:
        con.print(f"wrote {report.output}")


def _scoped(name: str, graph: str) -> str:
    return f"{graph}/{name}" if graph else name


def _split_note(report: FoldReport) -> str:
    split = sum(f.op != "BatchNormalization" for f in report.folded)
    return f" (incl. {split} per-channel Mul/Add)" if split else ""
