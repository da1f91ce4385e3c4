"""The Result of one boot: the one data type that crosses process boundaries, as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

VERDICTS = ("ok", "rejected", "crash")
CLASSES = (
    "cpu-fault", "stack-overflow", "kernel-panic", "hang", "out-of-memory", "heap-corruption",
    "vaddr-corruption", "kernel-mapping", "bad-entry",
)
# classes about what the kernel built rather than where it stopped: their signature names the
# field that disagreed
SEMANTIC_CLASSES = ("heap-corruption", "vaddr-corruption", "kernel-mapping", "bad-entry")
PANIC_PLUMBING = ("core::panicking::", "__rustc::", "rust_begin_unwind", "core::panic::",
                  "alloc::alloc::handle_alloc_error", "core::result::unwrap_failed",
                  "core::option::unwrap_failed", "core::option::expect_failed")


@dataclass
class Finding:
    """One anomaly an oracle saw, with the guest frames where it was seen."""

    cls: str
    evidence: list[str]
    frames: list[str] = field(default_factory=list)
    field: str | None = None
    pc: int | None = None

    def signature(self) -> str:
        names = [_frame_name(f) for f in self.frames]
        # the panic machinery is the same for every panic: name where it was called from
        top = [n for n in names if not n.startswith(PANIC_PLUMBING)][:3] or names[:3]
        parts = [self.cls, " < ".join(top) if top else "?"]
        if self.field and self.cls in SEMANTIC_CLASSES:
            parts.append(signature_field(self.field))
        return " | ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"class": self.cls, "evidence": self.evidence, "frames": self.frames,
                "field": self.field, "pc": self.pc, "signature": self.signature()}


_INDEX = re.compile(r"\[(\d+)\]")


def signature_field(field: str) -> str:
    """The field as a signature names it: `segments[0]` stays (the head of the segment table
    is what an allocator that hands one block out twice overwrites), any later index becomes
    `segments[n]`, because it only says how many program headers the input had."""
    return _INDEX.sub(lambda m: m.group(0) if m.group(1) == "0" else "[n]", field)


def _frame_name(frame: str) -> str:
    # `name+0x1f` → `name`: offsets move with every build and input
    return frame.rsplit("+0x", 1)[0] if "+0x" in frame else frame


@dataclass
class Result:
    verdict: str
    crash_class: str | None
    signature: str | None
    findings: list[Finding]
    pc: int
    symbol: str
    backtrace: list[str]
    segments: list[dict[str, int]]
    expected_segments: list[dict[str, int]]
    log: str
    instructions: int
    stop: str
    reject_reason: str | None = None
    registers: dict[str, int] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    kernel: str = ""
    kernel_sha256: str = ""
    input_sha256: str = ""
    snapshot: bool = False
    notes: list[str] = field(default_factory=list)
    heap_blocks: list[dict[str, Any]] = field(default_factory=list)
    # port accesses other than the debug console and the firmware's service port
    ports: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["findings"] = [f.to_json() for f in self.findings]
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def comparable(self) -> dict[str, Any]:
        """Everything except how the run was executed (snapshot or full boot)."""
        out = self.to_json()
        out.pop("snapshot")
        out.pop("notes")
        return out
