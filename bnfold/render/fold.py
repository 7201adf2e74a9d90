"""Rich rendering of a FoldReport."""
from __future__ import annotations

from ..report import FoldReport
from . import Output, human_size, plain, table, variance_table
from .calibrate import render_calibrate
from .verify import render_verify


def render_fold(report: FoldReport, out: Output) -> None:
    if out.handled_as_json(report):
        return
    con = out.out
    if report.calibration is not None:
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
    if report.merged:
        con.print(table(f"merged {len(report.merged)} sum(s) of parallel branches into one Conv each",
                        ("Add", "into", "kernel", "branches"),
                        ((_scoped(m.add, m.graph), m.conv, "×".join(map(str, m.kernel)), ", ".join(m.branches))
                         for m in report.merged)))
    if report.unmerged:
        con.print(table(f"kept {len(report.unmerged)} sum(s) of parallel branches", ("Add", "why they were kept"),
                        ((_scoped(u.add, u.graph), u.reason) for u in report.unmerged)))
    if not report.folded and not report.skipped and not report.rewritten:
        con.print("no BatchNormalization found")
    for note in report.notes:
        con.print(f"[dim]note:[/] {plain(note)}")
    if report.format == "onnx":
        counts = f"nodes {report.nodes_before} → {report.nodes_after}, BN {report.bn_before} → {report.bn_after}"
    else:
        counts = _torch_counts(report, con)
    con.print(f"{plain(counts)}, size {human_size(report.size_before)} → {human_size(report.size_after)}, "
              f"{report.seconds:.2f} s")
    if report.verify is not None:
        render_verify(report.verify, out)
    if report.output:
        con.print(f"wrote {plain(report.output)}")
    elif report.verify is not None and not report.verify.passed:
        con.print("[red]nothing written[/]: verification failed")


def _torch_counts(report: FoldReport, con) -> str:
    """Torch has no node count: what was folded, in which weight sets, and what stayed in the file."""
    for ws in report.weight_sets if len(report.weight_sets) > 1 or any(w.name for w in report.weight_sets) else ():
        prefix = f", keys under {ws.prefix!r}" if ws.prefix else ""
        con.print(plain(f"weight set {ws.name!r} ({ws.kind}, {ws.dtype}{prefix}): folded {ws.folded}, "
                        f"kept {ws.kept}"))
    if report.unchanged_keys:
        con.print(plain(f"written back unchanged: {', '.join(map(str, report.unchanged_keys))}"))
    total = len(report.folded) + len(report.skipped)
    if report.identity_bns and report.identity_bns == len(report.folded) and report.format in (
            "state_dict", "safetensors", "checkpoint"):
        how = " (kept as identity so the state_dict loads strictly)"
    elif report.identity_bns and report.identity_bns == len(report.folded) and report.format == "hf-folder":
        how = " (kept as identity so from_pretrained loads the folder strictly)"
    elif report.identity_bns:
        how = f" ({report.identity_bns} kept in place as identities, see the notes)"
    else:
        how = ""
    return f"folded {len(report.folded)} of {total} BNs{how}"


def _scoped(name: str, graph: str) -> str:
    return f"{graph}/{name}" if graph else name


def _split_note(report: FoldReport) -> str:
    split = sum(f.op != "BatchNormalization" for f in report.folded)
    return f" (incl. {split} per-channel Mul/Add)" if split else ""
