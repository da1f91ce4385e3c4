"""The Result of one boot: the one data type that crosses process boundaries, as JSON.

Its JSON form is versioned (`RESULT_VERSION`, described by `result.schema.json` beside this
file): `Result.from_json` reads what `to_json` wrote, takes a Result stored before the version
field existed as version 0 (the same fields), and refuses a newer version with a clear error.
Verdicts, crash classes and stop reasons are string enums, so they read and compare as the
strings they were before.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

RESULT_VERSION = 1


class Verdict(StrEnum):
    OK = "ok"
    REJECTED = "rejected"  # the kernel refused the input cleanly
    CRASH = "crash"


class CrashClass(StrEnum):
    CPU_FAULT = "cpu-fault"
    STACK_OVERFLOW = "stack-overflow"
    KERNEL_PANIC = "kernel-panic"
    HANG = "hang"
    OUT_OF_MEMORY = "out-of-memory"
    HEAP_CORRUPTION = "heap-corruption"
    VADDR_CORRUPTION = "vaddr-corruption"
    KERNEL_MAPPING = "kernel-mapping"
    BAD_ENTRY = "bad-entry"
    MEMORY_LEAK = "memory-leak"
    # a header field the ELF format has one standard value for, used unchecked: the crash goes
    # away with that value (kernel_emu.causes)
    UNCHECKED_FIELD = "unchecked-field"


class StopReason(StrEnum):
    """Why the guest stopped running."""

    UNTIL = "until"  # it reached the stop address (the user-mode entry, or the snapshot point)
    FAULT = "fault"  # a CPU exception
    BUDGET = "budget"  # the instruction budget or the watchdog
    HALT = "halt"  # hlt
    EFI_RETURN = "efi-return"  # efi_main returned to the firmware
    UC_ERROR = "uc-error"  # the emulator refused to go on (e.g. fetch from unmapped memory)


# how a run ended, as a job's statistics and the benchmarks count runs and their time
RUN_ENDINGS = ("enters ring 3, clean", "enters ring 3, a finding", "halts: rejected",
               "halts: a finding", "stopped by the watchdog", "budget spent", "fault",
               "uc-error", "efi-return")


def run_ending(stop: str, verdict: str, stalled: bool) -> str:
    """How a run ended (one of RUN_ENDINGS), from its Result's stop and verdict; `stalled`:
    the watchdog, not the profile's budget, stopped it."""
    if stop == StopReason.UNTIL:
        return "enters ring 3, a finding" if verdict == Verdict.CRASH else \
            "enters ring 3, clean"
    if stop == StopReason.HALT:
        return "halts: rejected" if verdict == Verdict.REJECTED else "halts: a finding"
    if stop == StopReason.BUDGET:
        return "stopped by the watchdog" if stalled else "budget spent"
    return str(stop)


VERDICTS = tuple(Verdict)
CLASSES = tuple(CrashClass)
# classes about what the kernel built rather than where it stopped: their signature names the
# field that disagreed
SEMANTIC_CLASSES = (CrashClass.HEAP_CORRUPTION, CrashClass.VADDR_CORRUPTION,
                    CrashClass.KERNEL_MAPPING, CrashClass.BAD_ENTRY, CrashClass.MEMORY_LEAK,
                    CrashClass.UNCHECKED_FIELD)


class ResultFormatError(ValueError):
    """A stored Result this version of the farm cannot read (one line for the user)."""
PANIC_PLUMBING = ("core::panicking::", "__rustc::", "rust_begin_unwind", "core::panic::",
                  "alloc::alloc::handle_alloc_error", "core::result::unwrap_failed",
                  "core::option::unwrap_failed", "core::option::expect_failed")
# the Rust library's own ways to the allocator (a Vec growing, a Box made)
ALLOC_PLUMBING = ("alloc::raw_vec::", "alloc::alloc::", "__rust_alloc", "__rust_realloc")
PLUMBING = PANIC_PLUMBING + ALLOC_PLUMBING


@dataclass
class Finding:
    """One anomaly an oracle saw, with the guest frames where it was seen."""

    cls: CrashClass
    evidence: list[str]
    frames: list[str] = field(default_factory=list)
    field: str | None = None
    pc: int | None = None
    # where the anomaly was seen when that is a structure rather than code (the segment table
    # the kernel printed): named by the signature instead of the frames, which say only where
    # the run happened to stop
    site: str | None = None

    def signature(self) -> str:
        names = [_frame_name(f) for f in self.frames]
        # the panic machinery is the same for every panic, the growth of a Vec for every Vec:
        # name where they were called from
        top = [n for n in names if not n.startswith(PLUMBING)][:3] or names[:3]
        parts = [self.cls, self.site or (" < ".join(top) if top else "?")]
        if self.field and self.cls in SEMANTIC_CLASSES:
            parts.append(signature_field(self.field))
        return " | ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out = {"class": self.cls, "evidence": self.evidence, "frames": self.frames,
               "field": self.field, "pc": self.pc, "signature": self.signature()}
        if self.site is not None:
            out["site"] = self.site
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Finding:
        return cls(CrashClass(raw["class"]), list(raw["evidence"]), list(raw["frames"]),
                   raw.get("field"), raw.get("pc"), raw.get("site"))


_INDEX = re.compile(r"\[(\d+)\]")
# what a heap walk finds wrong in a block header, whichever field showed it: one kind of damage
# (the header written over), however far the write went
HEADER_FIELDS = ("block.magic", "block.size", "heap.size")


def signature_field(field: str) -> str:
    """The field as a signature names it: any index becomes `[n]`, because which segment it
    was only says where in the input the bad program header sat; the fields of a damaged
    block header are one "block header"."""
    field = "block header" if field in HEADER_FIELDS else field
    return _INDEX.sub("[n]", field)


def _frame_name(frame: str) -> str:
    # `name+0x1f` → `name`: offsets move with every build and input
    return frame.rsplit("+0x", 1)[0] if "+0x" in frame else frame


class _InputDigest:
    """The `input_sha256` field. Set as a string, or to the input itself (`Result.of_input`),
    whose SHA-256 is then taken the first time the field is read: a fuzzing job reads it only
    for the few Results it keeps, and hashing every input took ~10 µs a run."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        if obj is None:
            return ""  # the field's default
        value = obj.__dict__.get(self.slot, "")
        if not isinstance(value, str):
            value = hashlib.sha256(value).hexdigest()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: str | bytes) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Result:
    verdict: Verdict
    crash_class: CrashClass | None
    signature: str | None
    findings: list[Finding]
    pc: int
    symbol: str
    backtrace: list[str]
    segments: list[dict[str, int]]
    expected_segments: list[dict[str, int]]
    log: str
    instructions: int
    stop: StopReason
    reject_reason: str | None = None
    registers: dict[str, int] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    kernel: str = ""
    kernel_sha256: str = ""
    # where a relocated (PE) image was loaded, which every address above depends on; absent
    # for an image run at its link addresses
    kernel_load_base: int | None = None
    input_sha256: str = _InputDigest()  # type: ignore[assignment]
    snapshot: bool = False
    notes: list[str] = field(default_factory=list)
    heap_blocks: list[dict[str, Any]] = field(default_factory=list)
    # port accesses other than the debug console and the firmware's service port
    ports: list[dict[str, Any]] = field(default_factory=list)

    def of_input(self, data: bytes) -> None:
        """This Result is of the input `data` (its `input_sha256`, taken when first read)."""
        self.input_sha256 = bytes(data)  # type: ignore[assignment]  # _InputDigest takes it

    def to_json(self) -> dict[str, Any]:
        # `dataclasses.asdict` deep-copies every number of a Result with a few hundred heap
        # blocks and segments: milliseconds a Result, where a job writes hundreds of them. The
        # same dict, its containers copied and its values shared (they are immutable).
        out = {name: _copied(getattr(self, name)) for name in _RESULT_FIELDS}
        if out["kernel_load_base"] is None:
            del out["kernel_load_base"]
        out["findings"] = [f.to_json() for f in self.findings]
        out["version"] = RESULT_VERSION
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Result:
        """The Result `to_json` wrote (any version up to this farm's)."""
        version = raw.get("version", 0)
        if not isinstance(version, int) or version > RESULT_VERSION:
            raise ResultFormatError(
                f"a Result in format version {version!r}, newer than this farm reads "
                f"({RESULT_VERSION}): upgrade the farm to read it")
        known = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.name in _REQUIRED} - raw.keys()
        if missing:
            raise ResultFormatError(f"not a Result: missing {', '.join(sorted(missing))}")
        body = {k: v for k, v in raw.items() if k in known}
        try:
            body["verdict"] = Verdict(body["verdict"])
            body["stop"] = StopReason(body["stop"])
            if body["crash_class"] is not None:
                body["crash_class"] = CrashClass(body["crash_class"])
            body["findings"] = [Finding.from_json(f) for f in body["findings"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ResultFormatError(f"not a Result: {e}") from None
        return cls(**body)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def loads(cls, text: str | bytes) -> Result:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ResultFormatError(f"not a Result: {e}") from None
        if not isinstance(raw, dict):
            raise ResultFormatError("not a Result: not a JSON object")
        return cls.from_json(raw)

    def comparable(self) -> dict[str, Any]:
        """Everything except how the run was executed (snapshot or full boot)."""
        out = self.to_json()
        out.pop("snapshot")
        out.pop("notes")
        return out


# the fields without a default: a Result lacks none of them
_REQUIRED = frozenset(("verdict", "crash_class", "signature", "findings", "pc", "symbol",
                       "backtrace", "segments", "expected_segments", "log", "instructions",
                       "stop"))
_RESULT_FIELDS = tuple(f.name for f in fields(Result))


def _copied(value: Any) -> Any:
    """`value` with its lists, tuples and dicts copied all the way down (what `asdict` makes
    of a field that holds no dataclass)."""
    kind = type(value)
    if kind is list:
        return [_copied(v) for v in value]
    if kind is dict:
        return {k: _copied(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(_copied(v) for v in value)
    return value
