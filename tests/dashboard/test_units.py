"""The dashboard's pieces on their own: charts, report views of odd or hostile data, the
kernel image helpers and the coverage sampler's bookkeeping."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest

from dashboard import charts, coverage, kernelinfo, report
from dashboard.app import create_app
from kernel_emu.image import load_image
from tests.dashboard.conftest import FarmData
from workers.coverage import hook_ranges

SEED_IMAGE = Path(__file__).parents[2] / "kernel_emu" / "images" / "seed.elf"


# charts ------------------------------------------------------------------------------------

def test_chart_of_nothing_and_of_junk() -> None:
    assert charts.line_chart("x", [], "edges").empty
    junk = [{"t": "now", "edges": 1}, {"t": 1.0, "edges": math.nan}, {"t": 2.0},
            {"t": math.inf, "edges": 3}]
    assert charts.line_chart("x", junk, "edges").empty


def test_chart_scales_into_its_box() -> None:
    series = [{"t": 1000.0 + 30 * i, "edges": 7 * i} for i in range(20)]
    c = charts.line_chart("edges", series, "edges", integer=True)
    xs = [x for x, _ in c.dots]
    ys = [y for _, y in c.dots]
    assert min(xs) == c.left and max(xs) == c.left + c.plot_width
    assert all(c.top <= y <= c.top + c.plot_height for y in ys)
    assert ys[0] > ys[-1]  # rising values go up
    assert c.last == "133"
    assert all(float(label) == int(float(label)) for _, label in c.y_ticks)
    assert [label for _, label in c.x_ticks][:2] == ["0s", "2m"]
    one = charts.line_chart("one", [{"t": 5.0, "edges": 0}], "edges")
    assert len(one.dots) == 1 and not one.empty


def test_nice_numbers() -> None:
    assert charts.nice_step(100) == 50 and charts.nice_step(7) == 2
    assert charts.human(1_500_000) == "1.5M" and charts.human(12) == "12"
    assert charts.time_step(600) == 120 and charts.time_step(10) == 2


# reports -------------------------------------------------------------------------------------

def _report() -> dict:
    return {
        "log": "[elf] segments count=2\n[elf] seg 0 vaddr=0x300028 memsz=0x10 filesz=0x10 "
               "offset=0x0 flags=0x5\n[elf] seg 1 vaddr=0x500000 memsz=0x10 filesz=0x10 "
               "offset=0x0 flags=0x6\nrejected: nope\n[PANIC] oh at x.rs:3\n",
        "expected_segments": [{"vaddr": 0x400000, "memsz": 0x10, "filesz": 0x10,
                               "offset": 0, "flags": 5}],
        "segments": [{"vaddr": 0x300028, "memsz": 0x10, "filesz": 0x10, "offset": 0,
                      "flags": 5}],
        "findings": [{"class": "heap-corruption", "evidence": ["returned 0x300028"],
                      "frames": ["a+0x1"], "field": "allocation.overlap", "pc": 5},
                     {"class": "vaddr-corruption", "evidence": ["seg 0"], "frames": [],
                      "field": "segments[0].vaddr", "pc": None}],
        "heap_blocks": [{"addr": 0x300000, "payload": 0x300028, "size": 0x20, "free": False,
                         "magic_ok": True},
                        {"addr": 0x300048, "payload": 0x300070, "size": 0x1000, "free": True,
                         "magic_ok": True},
                        {"addr": 0x301070, "payload": 0x301098, "size": 8, "free": False,
                         "magic_ok": False}],
    }


def test_log_marks_what_disagrees() -> None:
    lines, hidden = report.mark_log(_report())
    assert hidden == 0
    reasons = {line.number: line.reasons for line in lines}
    assert reasons[1] == ["the ELF has 1 PT_LOAD segments"]
    assert reasons[2] == ["vaddr: ELF says 0x400000"]
    assert reasons[3] == ["the ELF has no PT_LOAD segment 1"]
    assert reasons[4] == ["the kernel rejected the input"]
    assert reasons[5] == ["kernel panic"]
    many, hidden = report.mark_log({"log": "x\n" * (report.LOG_LINES_SHOWN + 5)})
    assert len(many) == report.LOG_LINES_SHOWN and hidden == 5


def test_segments_side_by_side_and_heap_picture() -> None:
    rep = _report()
    found = report.findings(rep)
    marks = report.field_marks(found)
    rows = report.segment_rows(rep, marks)
    assert len(rows) == 1
    key, want, got = rows[0]["cells"][0]
    assert (key, want.text, got.text, got.marks, got.differs) == \
        ("vaddr", "0x400000", "0x300028", [2], True)
    pic = report.heap_picture(rep, found)
    assert pic is not None
    assert [b.state for b in pic.boxes] == ["used", "free", "bad-magic"]
    assert [b.marks for b in pic.boxes] == [[1], [], []]
    assert all(b.x + b.width <= pic.width for b in pic.boxes)
    assert report.heap_picture({"heap_blocks": []}, []) is None


def test_views_survive_mistyped_reports() -> None:
    bad = {"log": 5, "findings": "x", "segments": [1, None, {"vaddr": "0x1"}],
           "expected_segments": {"a": 1}, "heap_blocks": [{"addr": "x"}, 3],
           "registers": {"rax": "1", "rbx": 2, "rcx": True}}
    assert report.mark_log(bad) == ([], 0)
    assert report.findings(bad) == []
    assert [r["cells"][0][2].text for r in report.segment_rows(bad, {})] == ["—"]
    assert report.heap_picture(bad, []) is not None
    assert report.registers(bad) == [("rbx", "0x0000000000000002")]


def test_elf_tables_never_raise_on_hostile_bytes() -> None:
    rng = random.Random(7)
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, 0x401000, 64, 0, 0, 64, 56,
                     0xFFFF, 64, 0, 0)
    samples = [b"", b"\x7fELF", bytes(header), bytes(header) + bytes(56) * 3]
    samples += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(200))) for _ in range(50)]
    for data in samples:
        t = report.elf_tables(data, {"segments[0].vaddr": [1], "segments": [2]})
        assert len(t.rows) <= report.PHDRS_SHOWN
    t = report.elf_tables(bytes(header) + bytes(56) * 70, {"segments": [2]})
    assert t.hidden == 70 - report.PHDRS_SHOWN
    header_marks = {name: cell.marks for name, cell in t.header}
    assert header_marks["phnum"] == header_marks["phoff"] == header_marks["phentsize"] == [2]


# the kernel image -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image():  # type: ignore[no-untyped-def]
    return load_image(SEED_IMAGE)


def test_disassembly_around_a_pc(image) -> None:  # type: ignore[no-untyped-def]
    import capstone

    sym = image.find_symbol("rustux::loader::elf::load")
    assert sym is not None
    seg = next(s for s in image.segments if s.vaddr <= sym.address < s.end)
    code = bytes(seg.data[sym.address - seg.vaddr:sym.address - seg.vaddr + sym.size])
    # an instruction well inside the function, as a pc of a finding would be
    pc = list(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(
        code, sym.address))[40].address
    insns, note = kernelinfo.disassemble_around(image, pc)
    assert note is None
    current = [i for i in insns if i.current]
    assert len(current) == 1 and current[0].address == pc
    assert insns.index(current[0]) == 8 and len(insns) == 17
    assert all(i.line is not None for i in insns[:3])
    # an address outside the image's code: nothing to show, and said so
    assert kernelinfo.disassemble_around(image, 0x10)[0] == []


def test_lines_blocks_and_frames(image) -> None:  # type: ignore[no-untyped-def]
    table = kernelinfo.line_table(image.path)
    assert table.present
    sym = image.find_symbol("rustux::loader::elf::load")
    assert sym is not None
    line = table.lookup(sym.address)
    assert line is not None and line.file == "src/loader/elf.rs"
    assert kernelinfo.bundled_image(image.sha256)
    assert kernelinfo.source_text(image.sha256, line) is not None
    assert kernelinfo.source_text(image.sha256, kernelinfo.Line("../../../etc/passwd", 1)) \
        is None
    assert kernelinfo.source_text("0" * 64, line) is None  # not an image this source built
    assert kernelinfo.frame_address(image, "rustux::loader::elf::load+0x10") == sym.address + 16
    assert kernelinfo.frame_address(image, "0x1234") == 0x1234
    assert kernelinfo.frame_address(image, "no::such+0x1") is None
    funcs = kernelinfo.functions(image)
    load = next(f for f in funcs if f.name == "rustux::loader::elf::load")
    assert load.blocks[0] == load.address and len(load.blocks) > 5
    assert all(load.address <= b < load.end for b in load.blocks)


def test_hook_ranges_leave_out_bulk_loops(image) -> None:  # type: ignore[no-untyped-def]
    ranges, names = hook_ranges(image)
    memset = image.find_symbol("memset")
    assert "memset" in names and memset is not None
    assert (memset.address, memset.address) in ranges
    inside = memset.address + 1
    assert not any(lo <= inside <= hi for lo, hi in ranges)
    text = image.text_ranges[0]
    assert ranges[0][0] == text[0]


def test_intervals() -> None:
    iv = coverage.Intervals([[10, 5], [12, 10], [40, 0], [100, 1]])
    assert 10 in iv and 21 in iv and 22 not in iv and 40 in iv and 41 not in iv
    assert 100 in iv and 9 not in iv and 101 not in iv


# an empty farm -------------------------------------------------------------------------------

@pytest.mark.redis
def test_pages_of_an_empty_farm(farm_data: FarmData) -> None:
    empty = farm_data.server.url.rsplit("/", 1)[0] + "/5"  # another, empty Redis database
    c = create_app(empty, send_task=lambda n, a: None).test_client()
    assert b"No campaign yet" in c.get("/").data
    assert b"0 of 0 buckets" in c.get("/buckets").data
    assert c.get("/coverage").status_code == 200
    assert c.get("/coverage/seed").status_code == 404  # no build registered there
    assert b"fuzzfarm_execs_total 0" in c.get("/metrics").data
