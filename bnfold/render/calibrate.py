"""Rich rendering of a CalibrationReport."""
from __future__ import annotations

from ..report import CalibrationReport
from . import Output, plain, table, variance_table


def render_calibrate(report: CalibrationReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    if report.variance:
        con.print(variance_table(report.variance))
    con.print(f"{report.samples} samples in {report.batches} batches of {report.batch_size} "
              f"({report.dropped_batches} dropped), upstream BNs on {report.upstream} statistics")
    con.print(table(("E[x] and Var[x] per BN (channel averages; Δ: the largest change over channels)"),
                    ("BN", "m", "mean old → new", "Δ mean (abs, σ)", "var old → new", "Δ var"),
                    ((b.bn, str(b.values_per_channel), f"{b.mean_old:.4g} → {b.mean_new:.4g}",
                      f"{b.mean_max_abs_change:.3g} ({b.mean_max_change_in_std:.2f}σ)",
                      f"{b.var_old:.4g} → {b.var_new:.4g}", f"{b.var_max_change:.2%}")
                     for b in report.bns)))
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
    if report.output:
        con.print(f"wrote {plain(report.output)}")
