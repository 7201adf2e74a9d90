"""Rich rendering of a BenchReport."""
from __future__ import annotations

from ..report import BenchReport
from rich.text import Text

from . import Output, human_size, plain, table


def _ms(t) -> str:
    return f"{t.median_ms:.3f} ({t.p10_ms:.3f}–{t.p90_ms:.3f})"


def render_bench(report: BenchReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    a, b = report.original, report.fused
    con.print(table("models", ("", "A (original)", "B (fused)"), [
        ("file", a.path, b.path), ("size", human_size(a.file_size), human_size(b.file_size)),
        ("nodes", str(a.nodes), str(b.nodes)), ("BatchNormalization", str(a.bn_nodes), str(b.bn_nodes))]))
    inputs = ", ".join(f"{i.name} {i.dtype}{i.shape}" for i in report.inputs)
    con.print(f"{report.threads} thread(s), {report.warmup} warm-up runs, interleaved; inputs: {plain(inputs)}")
    rows = []
    for r in report.results:
        rows.append((f"{r.provider} {r.level} ×{r.batch_size}", _ms(r.a), _ms(r.b), Text(f"{r.speedup:.3f}×", style="bold"),
                     f"{r.speedup_ci[0]:.3f}–{r.speedup_ci[1]:.3f}", str(r.a.runs)))
    con.print(table("latency ms, median (p10–p90); speed-up = A / B", ("provider level batch", "A original",
                                                                         "B fused", "speed-up", "95% CI", "runs"),
                    rows))
    sessions = ", ".join(f"{r.provider} {r.level}: {r.a.session_ms:.0f}/{r.b.session_ms:.0f}" for r in report.results)
    con.print(f"session creation ms A/B: {sessions}")
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
