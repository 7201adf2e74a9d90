"""Rich rendering of a BenchReport."""
from __future__ import annotations

from rich.text import Text

from ..report import BenchReport, BenchResult
from . import Output, human_size, plain, table

VERDICT_STYLE = {"B faster": "bold green", "B slower": "bold red", "same within ±1 %": "bold",
                 "cannot tell": "bold yellow"}


AA_STYLE = {"passed": "green", "biased": "bold yellow"}
SHORT_RUNTIME = {"onnxruntime": "ort"}
CLOCK = {"thread cpu": "CPU time of the timing thread (1 thread: preemption not counted)", "wall": "wall"}


def _ms(t) -> str:
    return f"{t.median_ms:.3f} ({t.p10_ms:.3f}–{t.p90_ms:.3f})"


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def render_bench(report: BenchReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    a, b = report.original, report.fused
    con.print(table("models", ("", "A (original)", "B (fused)"), [
        ("file", a.path, b.path), ("format", a.format, b.format),
        ("size", human_size(a.file_size), human_size(b.file_size)),
        ("nodes", _count(a.nodes), _count(b.nodes)), ("BatchNormalization", _count(a.bn_nodes), _count(b.bn_nodes))]))
    inputs = ", ".join(f"{i.name} {i.dtype}{i.shape}" for i in report.inputs)
    how = f"{report.seconds:g} s timed" if report.seconds is not None else f"≥ {report.runs} runs of each"
    if report.aa_checked:
        how += " (+ half again for A′, A's copy for the A/A check)"
    con.print(f"runtime: {', '.join(report.runtimes)}; {report.threads} thread(s) ({plain(report.threads_reason)}); "
              f"{how} per configuration in {report.blocks} blocks with fresh sessions, {report.warmup} warm-up "
              f"run(s) each; inputs: {plain(inputs)}")
    clocks = " and ".join(sorted({CLOCK.get(r.clock, r.clock) for r in report.results}))
    con.print(table(f"latency ms, median (p10–p90); clock: {clocks}", ("configuration", "A original", "B fused"),
                    [(_name(r), _ms(r.a), _ms(r.b)) for r in report.results]))
    aa = ("A/A′",) if report.aa_checked else ()
    con.print(table("speed-up A / B: median over blocks, 95 % interval, block-to-block spread",
                    ("configuration", "speed-up", "95 % interval", "spread", *aa, "verdict"),
                    [_row(r, bool(aa)) for r in report.results]))
    for r in report.results:
        con.print(f"[dim]{plain(_name(r))}:[/] {plain(r.verdict)}: {plain(r.why)}")
    for r in report.results:
        if r.placement:
            con.print(f"node placement {plain(_name(r))}: {plain(_placement(r.placement))}")
    made = ", ".join(f"{_name(r)}: {r.a.session_ms:.1f}/{r.b.session_ms:.1f}" for r in report.results)
    con.print(f"making a fresh session or module copy, ms A/B: {plain(made)}")
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
    if report.fail_below is not None:
        con.print(f"--fail-below {report.fail_below:g}: {plain(report.fail_below_outcome)} "
                  f"({plain(report.fail_below_why)})")


def _name(r: BenchResult) -> str:
    return f"{SHORT_RUNTIME.get(r.runtime, r.runtime)} {r.provider} {r.level} ×{r.batch_size}"


def _row(r: BenchResult, aa: bool) -> tuple:
    verdict = Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, ""))
    check = (Text(f"{r.aa_speedup:.3f} " + ("ok" if r.aa_check == "passed" else f"bias {r.aa_bias_pct:.1f} %"),
                  style=AA_STYLE.get(r.aa_check, "")),) if aa else ()
    return (_name(r), Text(f"{r.speedup:.3f}×", style="bold"), f"{r.speedup_ci[0]:.3f}–{r.speedup_ci[1]:.3f}",
            f"±{r.spread_pct:.1f} %", *check, verdict)


def _placement(placement: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{who}: " + ", ".join(f"{n} on {p}" for p, n in sorted(counts.items()))
                     for who, counts in placement.items())
