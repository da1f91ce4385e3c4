"""Human-readable rendering of boot Results."""

from __future__ import annotations

from kernel_emu.result import Result


def render_result(result: Result, log_lines: int = 12) -> str:
    out: list[str] = []
    head = f"verdict: {result.verdict}"
    if result.crash_class:
        head += f"   class: {result.crash_class}"
    out.append(head)
    if result.signature:
        out.append(f"signature: {result.signature}")
    if result.reject_reason:
        out.append(f"rejected: {result.reject_reason}")
    out.append(f"kernel: {result.kernel} ({result.kernel_sha256[:12]})   input: "
               f"{result.input_sha256[:12]}   instructions: {result.instructions}   "
               f"stopped: {result.stop}")
    if result.findings:
        out.append("")
        out.append("findings (first is the cause, the rest its consequences):")
        for i, f in enumerate(result.findings):
            out.append(f"  {i + 1}. {f.cls}" + (f" [{f.field}]" if f.field else ""))
            for line in f.evidence:
                out.append(f"       {line}")
    if result.expected_segments or result.segments:
        out.append("")
        out.append("segments   ELF says                          kernel loaded")
        for i in range(max(len(result.expected_segments), len(result.segments))):
            want = result.expected_segments[i] if i < len(result.expected_segments) else None
            got = result.segments[i] if i < len(result.segments) else None
            out.append(f"  {i:<3}    {_seg(want):<33} {_seg(got)}")
    if result.crash_class:
        out.append("")
        out.append("backtrace:")
        frames = result.findings[0].frames or result.backtrace
        for i, frame in enumerate(frames[:16]):
            out.append(f"  #{i:<2} {frame}")
    if log_lines > 0 and result.log:
        out.append("")
        lines = result.log.splitlines()
        out.append(f"kernel log (last {min(log_lines, len(lines))} of {len(lines)} lines):")
        out.extend(f"  | {line}" for line in lines[-log_lines:])
    for note in result.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _seg(seg: dict[str, int] | None) -> str:
    if seg is None:
        return "-"
    return f"vaddr={seg['vaddr']:#x} memsz={seg['memsz']:#x}"


def render_summary_row(name: str, kernel: str, result: Result) -> str:
    what = result.signature or (f"rejected: {result.reject_reason}" if result.reject_reason
                                else "loaded, entered ring 3")
    if result.findings:
        what += f"  — {result.findings[0].evidence[0]}"
        vaddr = next((f for f in result.findings if f.cls == "vaddr-corruption"), None)
        if vaddr is not None and vaddr is not result.findings[0]:
            what += f"; then {vaddr.evidence[0]}"
    return f"{name:<28} {kernel:<8} {result.verdict:<9} {what}"
