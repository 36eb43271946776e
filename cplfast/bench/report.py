"""Markdown rendering of a results document: conditions, one table per op, targets, failures.

A provider's cell is ``median [p20–p80] (min–max)`` over the timing rounds, in ms; a result that did not
match the reference is shown as ``WRONG`` before its timing, a provider that failed as ``FAIL``.
"""

from __future__ import annotations

STANDARD = ("eager", "compile", "cplfast")


def _ms(value) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def spread_cell(row: dict) -> str:
    """``median [p20–p80] (min–max)``; rows of older documents without min/max show the percentiles only."""
    text = f'{_ms(row["median_ms"])} [{_ms(row.get("p20_ms"))}–{_ms(row.get("p80_ms"))}]'
    if row.get("min_ms") is not None and row.get("max_ms") is not None:
        text += f' ({_ms(row["min_ms"])}–{_ms(row["max_ms"])})'
    if row.get("correct") is False:
        text = "**WRONG** " + text
    return text


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _mb(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def providers_of(doc: dict, op: str) -> list[str]:
    seen = [r["provider"] for r in doc["results"] if r["op"] == op]
    extras = sorted({p for p in seen if p not in STANDARD})
    return [p for p in STANDARD if p in seen] + extras


def op_table(doc: dict, op: str) -> list[str]:
    providers = providers_of(doc, op)
    rows = {(r["mode"], r["shape"], r["provider"]): r for r in doc["results"] if r["op"] == op}
    details = {(d["mode"], d["shape"], d["provider"]): d for d in doc.get("details", []) if d["op"] == op}
    ratios = {(r["mode"], r["shape"]): r for r in doc["ratios"] if r["op"] == op}
    names = {c["shape"]: f'{c["name"]} ({c["group"]})' for c in doc.get("cases", []) if c["op"] == op}
    header = (["case", "shape", "mode"] + [f"{p} ms" for p in providers] + ["× eager", "× compile",
              "cplfast GB/s (% BW)", "peak MB " + " / ".join(providers)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = []
    for r in doc["results"]:
        if r["op"] == op and (r["mode"], r["shape"]) not in seen:
            seen.append((r["mode"], r["shape"]))
    for mode, shape in seen:
        cells = [names.get(shape, ""), f"`{shape}`", mode]
        for p in providers:
            row = rows.get((mode, shape, p))
            if row is None:
                cells.append("")
            elif row["median_ms"] is None:
                error = details.get((mode, shape, p), {}).get("error") or ""
                cells.append("skip" if error.startswith("skipped") else "FAIL")
            else:
                cells.append(spread_cell(row))
        ratio = ratios.get((mode, shape), {})
        cells += [_x(ratio.get("speedup_vs_eager")), _x(ratio.get("speedup_vs_compile"))]
        fused = details.get((mode, shape, "cplfast"), {})
        if fused.get("gb_per_s") is not None:
            pct = fused.get("pct_of_bandwidth")
            cells.append(f'{fused["gb_per_s"]:.3g}' + (f" ({pct:.0f}%)" if pct is not None else ""))
        elif fused.get("tflop_per_s") is not None:
            cells.append(f'{fused["tflop_per_s"]:.2f} TFLOP/s')
        else:
            cells.append("—")
        cells.append(" / ".join(_mb(rows.get((mode, shape, p), {}).get("peak_mb")) for p in providers))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render(doc: dict) -> str:
    cond = doc.get("conditions", {})
    ops = []
    for r in doc["results"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    out = ["# cplfast benchmarks", ""]
    out.append(f'**Device** {doc["device"]} · **torch** {doc["torch"]} · **triton** {doc["triton"]} · '
               f'**commit** `{doc["commit"]}` · **date** {doc["date"]}')
    out.append("")
    bandwidth = cond.get("bandwidth_gbps")
    facts = [
        f'dtype {cond.get("dtype", "?")}',
        f'quick: {"yes" if cond.get("quick") else "no"}',
        f'cplfast backend `{cond.get("cplfast_backend", "?")}`',
        f'measured copy bandwidth {bandwidth:.0f} GB/s' if bandwidth else "bandwidth not measured",
    ]
    out.append("- " + " · ".join(facts))
    if cond.get("shapes_note"):
        out.append(f'- shapes: {cond["shapes_note"]}')
    impl = cond.get("cplfast_impl") or {}
    if impl:
        out.append("- cplfast provider runs: " + ", ".join(f"{op} → {kind}" for op, kind in impl.items()))
    if cond.get("timer"):
        out.append(f'- timing: {cond["timer"]}')
    if cond.get("peak_mb"):
        out.append(f'- peak MB: {cond["peak_mb"]}')
    out.append("- provider cells: median [p20–p80] (min–max) in ms over the timing rounds; **WRONG**: the output "
               "did not match the float64 reference (see Failures)")
    if cond.get("correctness"):
        out.append(f'- correctness: {cond["correctness"]}')
    out.append("- speedups are median(eager or compile) / median(cplfast) (wrong results left out); GB/s counts the "
               "minimum bytes (benchmarks/NOTES.md)")
    for op in ops:
        out += ["", f"## {op}", ""] + op_table(doc, op)
    targets = doc.get("targets", [])
    if targets:
        out += ["", "## SPEC §8 targets (training shapes)", ""]
        if cond.get("reduced_shapes"):
            out += ["Reduced CPU shapes: the bars below are meant for SPEC shapes on a GPU and do not apply here.", ""]
        out += ["| op | shape | mode | metric | target | value | met |", "|---|---|---|---|---|---|---|"]
        for t in targets:
            value = t["value"]
            shown = "—" if value is None else (str(value) if isinstance(value, bool) else f"{value:.2f}")
            met = {True: "yes", False: "**no**", None: "unmeasured"}[t["met"]]
            out.append(f'| {t["op"]} | `{t["shape"]}` | {t["mode"]} | {_cell(t["metric"])} | {t["target"]} | '
                       f'{shown} | {met} |')
    failures = doc.get("failures", [])
    if failures:
        out += ["", "## Failures", "", "| op | mode | shape | provider | error |", "|---|---|---|---|---|"]
        for f in failures:
            out.append(f'| {f["op"]} | {f["mode"]} | `{f["shape"]}` | {f["provider"]} | {_cell(f["error"])} |')
    skipped = doc.get("skipped", [])
    if skipped:
        out += ["", "## Skipped", ""] + [f'- {s["op"]}: {s["reason"]}' for s in skipped]
    return "\n".join(out) + "\n"
