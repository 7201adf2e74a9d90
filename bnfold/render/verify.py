"""Rich rendering of a VerifyReport."""
from __future__ import annotations

from rich.table import Table

from ..report import VerifyReport
from . import Output, plain


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_verify(report: VerifyReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    inputs = ", ".join(f"{i.name} {i.dtype}{i.shape}" for i in report.inputs)
    source = "inputs from --data" if report.seed is None else f"seed {report.seed}, {report.batches} batch(es)"
    con.print(f"{report.runtime} ({plain(report.provider)}, optimizations off), {source}: {plain(inputs)}")
    # One column per output and one row per figure: fits a terminal for the usual 1–4 outputs.
    t = Table(title="fused vs original", title_justify="left")
    t.add_column("")
    for o in report.outputs:
        t.add_column(plain(o.name), justify="right")
    rows = [
        ("result", lambda o: "[green]pass[/]" if o.passed else "[red]FAIL[/]"),
        ("max abs error", lambda o: _g(o.max_abs_error)),
        ("max rel error", lambda o: _g(o.max_rel_error)),
        ("mean abs error", lambda o: _g(o.mean_abs_error)),
        ("cosine similarity", lambda o: f"{o.cosine_similarity:.9f}"),
        ("out of tolerance", lambda o: f"{o.mismatched} ({o.mismatch_fraction:.2%})"),
        ("min atol to pass", lambda o: _g(o.min_atol_to_pass)),
        ("min rtol to pass", lambda o: _g(o.min_rtol_to_pass)),
        ("argmax agreement", lambda o: "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.0%}"),
        ("atol / rtol", lambda o: f"{o.atol:g} / {o.rtol:g}"),
    ]
    for label, cell in rows:
        t.add_row(label, *(cell(o) for o in report.outputs))
    con.print(t)
    for o in report.failures:
        where = f" (worst at index {o.worst_index})" if o.worst_index else ""
        con.print(f"[red]{plain(o.name)}[/]: {plain(o.message)}{where}")
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
    con.print("[green]PASS[/]: the fused model computes what the original did" if report.passed
              else "[red]FAIL[/]: the fused model differs from the original")
