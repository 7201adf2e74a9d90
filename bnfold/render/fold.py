"""Rich rendering of a FoldReport."""
from __future__ import annotations

from ..report import FoldReport, folded_sites, site_kind
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
    sites = report.sites
    if report.folded:
        con.print(table(f"folded {_sites_title(sites.folded, sites.folded_kinds)}", ("BN", "into", "pattern"),
                        (_folded_row(group) for group in folded_sites(report.folded))))
    if report.skipped:
        con.print(table(f"kept {_sites_title(sites.kept, sites.kept_kinds)}", ("BN", "why it was kept"),
                        ((_scoped(s.bn, s.graph) + _kind_note(s.op), s.reason) for s in report.skipped)))
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


def _sites_title(n: int, kinds: dict[str, int]) -> str:
    """"20 BatchNormalization" while every site is one; else "20 BN-like sites (2 BatchNormalization, 18 Mul+Add)"."""
    if set(kinds) <= {"BatchNormalization"}:
        return f"{n} BatchNormalization"
    return f"{n} BN-like site{'s' if n != 1 else ''} ({', '.join(f'{count} {kind}' for kind, count in kinds.items())})"


def _folded_row(group) -> tuple[str, str, str]:
    first = group[0]
    names = " + ".join(f.bn for f in group)
    return _scoped(names, first.graph) + _kind_note(site_kind(group)), first.producer, " / ".join(f.pattern for f in group)


def _kind_note(kind: str) -> str:
    return "" if kind == "BatchNormalization" else f" ({kind})"
