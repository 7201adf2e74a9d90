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


def table(title: str, columns: tuple[str, ...], rows) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    return t


def variance_table(corrections) -> Table:
    return table("stored variance corrected by m/(m−1)", ("BN", "m", "factor"),
                 ((v.bn, str(v.values_per_channel), f"{v.factor:.6g}") for v in corrections))


def render_fold(report: FoldReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    if report.calibration is not None:
        from .calibrate import render_calibrate

        render_calibrate(report.calibration, out)
    if report.variance:
        con.print(variance_table(report.variance))
    if report.folded:
        con.print(table(f"folded {len(report.folded)} BatchNormalization{_split_note(report)}",
                        ("BN", "into", "pattern"),
                        ((_scoped(f.bn, f.graph) + ("" if f.op == "BatchNormalization" else f" ({f.op})"),
                          f.producer, f.pattern) for f in report.folded)))
    if report.skipped:
        con.print(table(f"kept {len(report.skipped)} BatchNormalization", ("BN", "why it was kept"),
                        ((_scoped(s.bn, s.graph), s.reason) for s in report.skipped)))
    if report.rewritten:
        con.print(table(f"rewrote {len(report.rewritten)} BatchNormalization as Mul+Add",
                        ("BN", "why it could not fold"), ((_scoped(r.bn, r.graph), r.reason) for r in report.rewritten)))
    if not report.folded and not report.skipped and not report.rewritten:
        con.print("no BatchNormalization found")
    for note in report.notes:
        con.print(f"[dim]note:[/] {note}")
    con.print(
        f"nodes {report.nodes_before} → {report.nodes_after}, BN {report.bn_before} → {report.bn_after}, "
        f"size {_size(report.size_before)} → {_size(report.size_after)}, {report.seconds:.2f} s"
    )
    if report.verify is not None:
        from .verify import render_verify

        render_verify(report.verify, out)
    if report.output:
        con.print(f"wrote {report.output}")
    elif report.verify is not None and not report.verify.passed:
        con.print("[red]nothing written[/]: verification failed")


def _scoped(name: str, graph: str) -> str:
    return f"{graph}/{name}" if graph else name


def _split_note(report: FoldReport) -> str:
    split = sum(f.op != "BatchNormalization" for f in report.folded)
    return f" (incl. {split} per-channel Mul/Add)" if split else ""
