"""Rich rendering of a VerifyReport."""
from __future__ import annotations

from rich.table import Table

from ..report import OutputComparison, SiteComparison, VerifyReport
from . import Output, plain


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


# One column per output and one row per figure fits a terminal for the usual 1–4 outputs; nested
# outputs (a detector's boxes, scores and labels per image) get one row per output instead, with
# the figures that fit beside the name (--json has them all).
WIDE_OUTPUTS = 4
ROW_FIGURES = ("result", "max abs error", "max rel error", "out of tolerance")
FIGURES = [
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


def _cell(o: OutputComparison, label: str, figure) -> str:
    """A figure of a tensor output; a non-tensor value or a structure mismatch has only a result."""
    return figure(o) if o.kind == "tensor" or label == "result" else "-"


def _table(outputs: list[OutputComparison]) -> Table:
    t = Table(title="fused vs original", title_justify="left")
    if len(outputs) <= WIDE_OUTPUTS:
        t.add_column("")
        for o in outputs:
            t.add_column(plain(o.name), justify="right")
        for label, figure in FIGURES:
            t.add_row(label, *(_cell(o, label, figure) for o in outputs))
        return t
    figures = [(label, figure) for label, figure in FIGURES if label in ROW_FIGURES]
    t.add_column("output", overflow="fold", ratio=2)
    for label, _ in figures:
        t.add_column(label, justify="right", ratio=1)
    for o in outputs:
        t.add_row(plain(o.name), *(_cell(o, label, figure) for label, figure in figures))
    return t


SKIPPED_SHOWN = 3


def _ratio(s: SiteComparison) -> str:
    return "∞" if s.ratio == float("inf") else f"{s.ratio:.3g}"


def _sites_table(failing: list[SiteComparison], checked: int) -> Table:
    t = Table(title=f"fold sites off by more than one rounding of their weights ({len(failing)} of {checked})",
              title_justify="left")
    t.add_column("layer", overflow="fold", ratio=3)
    for label in ("op", "error / bound", "test", "channel", "max abs error"):
        t.add_column(label, justify="right", ratio=1)
    for s in sorted(failing, key=lambda s: -s.ratio):
        t.add_row(plain(s.layer), s.op, f"[red]{_ratio(s)}[/]", s.test, "-" if s.channel is None else str(s.channel),
                  _g(s.max_abs_error))
    return t


def _render_sites(report: VerifyReport, out: Output) -> None:
    """Failing sites in a table, each with its message; passing ones in one line (--json has them all)."""
    con = out.out
    failing = report.failed_sites
    if failing:
        con.print(_sites_table(failing, len(report.sites)))
        for s in failing:
            con.print(f"[red]{plain(s.name)}[/]: {plain(s.message)}")
    elif report.sites:
        closest = max(report.sites, key=lambda s: s.ratio)
        con.print(f"fold sites: {len(report.sites)} checked, each within one rounding of its weights "
                  f"(closest: {_ratio(closest)} of its bound, {closest.op} {plain(closest.layer)!r}, {closest.test} test)")
    if report.skipped_sites:
        shown = "; ".join(f"{plain(s.name)}: {plain(s.reason)}" for s in report.skipped_sites[:SKIPPED_SHOWN])
        more = f" (and {len(report.skipped_sites) - SKIPPED_SHOWN} more; --json lists them)" \
            if len(report.skipped_sites) > SKIPPED_SHOWN else ""
        con.print(f"[dim]note:[/] {len(report.skipped_sites)} folded BN(s) not checked on their own: {shown}{more}")


def render_verify(report: VerifyReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    inputs = ", ".join(f"{i.name} {i.dtype}{i.shape}" for i in report.inputs)
    source = "inputs from --data" if report.seed is None else f"seed {report.seed}, {report.batches} batch(es)"
    optimizations = ", optimizations off" if "onnxruntime" in report.runtime else ""
    con.print(f"{report.runtime} ({plain(report.provider)}{optimizations}), {source}: {plain(inputs)}")
    con.print(_table(report.outputs))
    for o in report.failures:
        where = f" (worst at index {o.worst_index})" if o.worst_index else ""
        con.print(f"[red]{plain(o.name)}[/]: {plain(o.message)}{where}")
    _render_sites(report, out)
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
    sites = f"; {len(report.sites)} fold site(s) within one rounding" if report.sites else ""
    con.print(f"[green]PASS[/]: the fused model computes what the original did "
              f"({report.compared_elements} tensor elements compared{sites})" if report.passed
              else f"[red]FAIL[/]: the fused model differs from the original (found by the {report.decided_by})")
