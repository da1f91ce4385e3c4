"""A crash's cause in the input (kernel_emu.causes): a header field the kernel used unchecked
files every symptom of it under one signature; a field that is wrong but not why the kernel
crashed changes nothing."""

from __future__ import annotations

import pytest

from kernel_emu.causes import FIXED_FIELDS, broken_fields
from kernel_emu.elflayout import ELF64_EHDR, ELF64_PHDR, PT_NOTE
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.reproducers import REPRODUCERS, set_header

CAUSE = "unchecked-field | ELF header | e_phentsize"


@pytest.fixture(scope="module")
def seed() -> Executor:
    return Executor(load_profile("seed"), watchdog=200_000)


def test_every_symptom_of_an_unchecked_stride_is_one_signature(seed: Executor,
                                                               base_elf: bytes) -> None:
    # 0 walks the first entry for ever; 16 to 55 read fewer entries, each across two headers
    raw = Executor(load_profile("seed"), watchdog=200_000, causes=False)
    consequences = set()
    for stride in (0, 16, 40, 55):
        data = set_header(base_elf, phentsize=stride)
        result = seed.run(data)
        assert result.verdict == "crash" and result.signature == CAUSE, stride
        cause, first = result.findings[0], result.findings[1]
        assert cause.field == "e_phentsize" and cause.site == "ELF header"
        assert cause.evidence[0] == (f"e_phentsize is {stride:#x}, not 0x38 (the size of an "
                                     f"Elf64_Phdr)")
        assert "the kernel loads it" in cause.evidence[1]
        # the frames are where the damage showed; the rest of the chain is the run's own
        assert cause.frames == first.frames
        assert [f.to_json() for f in result.findings[1:]] == \
            [f.to_json() for f in raw.run(data).findings]
        consequences.add(first.signature())
    assert {c.split(" | ")[0] for c in consequences} == {"hang", "vaddr-corruption"}


def _padded(elf: bytes, stride: int) -> bytes:
    """`elf` with its program headers `stride` apart (padding after each), at its end."""
    phoff, phnum = ELF64_EHDR["e_phoff"].read(elf), ELF64_EHDR["e_phnum"].read(elf)
    table = b"".join(elf[phoff + i * 56:phoff + (i + 1) * 56] + b"\xee" * (stride - 56)
                     for i in range(phnum))
    out = bytearray(elf + bytes(-len(elf) % 8))
    ELF64_EHDR["e_phoff"].write(out, len(out))
    ELF64_EHDR["e_phentsize"].write(out, stride)
    return bytes(out + table)


def test_a_padded_table_the_kernel_walks_short_is_the_same_cause(seed: Executor,
                                                                base_elf: bytes) -> None:
    # entries 112 bytes apart: the seed counts the table's end in 56-byte entries and reads
    # two of three. Put right, the same entries are laid 56 bytes apart, and it loads
    data = _padded(base_elf, 112)
    result = seed.run(data)
    assert result.signature == CAUSE
    assert result.findings[1].signature() == "vaddr-corruption | segment table | segments"
    assert result.findings[0].evidence[1].startswith(
        "with e_phentsize 0x38 (the same entries, 0x38 apart) and nothing else changed, "
        "the kernel loads it")
    field = next(f for f in FIXED_FIELDS if f.name == "e_phentsize")
    laid = _padded(base_elf, 56)  # the file keeps its length: what the entries left after
    right = field.put_right(data)  # them stays as it was
    assert right is not None and right[:len(laid)] == laid
    # a stride the seed walks right (64: three entries before the 56-byte count's end) is
    # no crash, unusual as it is
    assert seed.run(_padded(base_elf, 64)).verdict == "ok"


def test_the_executors_machine_is_the_inputs_after_the_second_boot(seed: Executor,
                                                                   base_elf: bytes) -> None:
    # the field put right boots on a second executor: what a caller reads of this one after
    # the run (the stop, the watchdog, the console) is still the input's
    data = set_header(base_elf, phentsize=0)
    result = seed.run(data)
    assert seed.stalled_at > 0
    assert result.stop == "budget" and seed.last_observations is not None
    assert seed.last_observations.stop == "budget"


def test_a_wrong_field_that_is_not_the_cause_changes_nothing(seed: Executor,
                                                             base_elf: bytes) -> None:
    # the seed never reads e_version or e_ehsize: with them wrong, an overflowing segment
    # (RX-05) crashes as it does without, and a clean input loads
    rx05 = next(r for r in REPRODUCERS if r.bug == "RX-05").make(base_elf)
    alone = seed.run(rx05)
    for field in ("version", "ehsize"):
        data = set_header(rx05, **{field: 7})
        assert [f.name for f in broken_fields(data)] == [f"e_{field}"]
        assert seed.run(data).to_json()["findings"] == alone.to_json()["findings"]
        assert seed.run(set_header(base_elf, **{field: 7})).verdict == "ok"


def test_the_fixed_build_refuses_the_stride(base_elf: bytes) -> None:
    fixed = Executor(load_profile("fixed"))
    for stride in (0, 16, 40):
        result = fixed.run(set_header(base_elf, phentsize=stride))
        assert result.verdict == "rejected", stride
        assert result.reject_reason == "bad program header entry size"


def test_the_rules(base_elf: bytes) -> None:
    assert broken_fields(base_elf) == []
    assert broken_fields(base_elf[:63]) == []  # too short for a header: nothing to judge
    # an entry size matters only when the table has entries
    assert broken_fields(set_header(base_elf, phentsize=0, phnum=0)) == []
    assert [f.name for f in broken_fields(set_header(base_elf, phentsize=64))] == [
        "e_phentsize"]
    # a padded table over the header itself cannot be laid out again without changing the
    # header: not judged. A smaller size needs no moving (and is judged even where the
    # table lies over it: the stride is what lays the entries out)
    field = next(f for f in FIXED_FIELDS if f.name == "e_phentsize")
    assert field.put_right(set_header(base_elf, phoff=0, phentsize=112)) is None
    assert field.put_right(set_header(base_elf, phoff=0, phentsize=8)) == \
        set_header(base_elf, phoff=0)
    # hostile values: a table past the end of the file, the largest stride and count
    for phoff in (len(base_elf) - 8, 1 << 63):
        far = set_header(base_elf, phoff=phoff, phentsize=0xFFFF, phnum=0xFFFF)
        right = field.put_right(far)
        assert right is None or len(right) == len(far)
    # a note in the padding, where the entries would move: not judged either
    padded = bytearray(_padded(base_elf, 112))
    phoff = ELF64_EHDR["e_phoff"].read(padded)
    last = phoff + 112 * (ELF64_EHDR["e_phnum"].read(padded) - 1)
    ELF64_PHDR["p_type"].write(padded, PT_NOTE, last)
    ELF64_PHDR["p_offset"].write(padded, phoff + 56, last)
    ELF64_PHDR["p_filesz"].write(padded, 16, last)
    assert field.put_right(bytes(padded)) is None
    # section headers, which no oracle reads: the entry size alone, however far apart the
    # entries are and whatever lies between them
    shentsize = next(f for f in FIXED_FIELDS if f.name == "e_shentsize")
    spread = set_header(base_elf, shoff=64, shentsize=256, shnum=48)
    assert shentsize.put_right(spread) == set_header(spread, shentsize=64)
    assert [f.name for f in broken_fields(set_header(base_elf, shentsize=8))] == \
        (["e_shentsize"] if ELF64_EHDR["e_shnum"].read(base_elf) else [])
    # several broken: in file order
    data = bytearray(set_header(base_elf, phentsize=8, version=2, machine=3))
    data[4] = 1  # EI_CLASS: ELFCLASS32
    assert [f.name for f in broken_fields(bytes(data))] == [
        "EI_CLASS", "e_machine", "e_version", "e_phentsize"]
    # each put right alone, nothing else changed
    for field in FIXED_FIELDS:
        if field.broken(bytes(data)):
            fixed = field.put_right(bytes(data))
            assert fixed is not None
            assert not field.broken(fixed) and len(fixed) == len(data)
            assert sum(a != b for a, b in zip(fixed, data, strict=True)) <= field.size


def test_a_field_a_program_header_lies_over_is_not_judged(base_elf: bytes) -> None:
    """With the program headers at offset 0, e_phnum and e_shentsize are the second entry's
    p_type (4 and 0: a PT_NOTE, which a fuzzing job met). Put right, e_shentsize would change
    that entry too, so it is not judged; where no entry lies over it, its value alone is put
    right."""
    shentsize = next(f for f in FIXED_FIELDS if f.name == "e_shentsize")
    over = set_header(base_elf, phoff=0, phnum=4, shentsize=0)
    assert ELF64_PHDR["p_type"].read(over, 56) == PT_NOTE
    assert [f.name for f in broken_fields(over)] == ["e_shentsize"]
    assert shentsize.put_right(over) is None
    assert shentsize.put_right(set_header(base_elf, shentsize=0)) == base_elf
    # e_version lies under the first entry (its p_vaddr) of a table at offset 0 too
    version = next(f for f in FIXED_FIELDS if f.name == "e_version")
    assert version.put_right(set_header(over, version=7)) is None
    assert version.put_right(set_header(base_elf, version=7)) == base_elf


def test_the_standard_header_shortcut_says_what_each_field_says(base_elf: bytes) -> None:
    # broken_fields answers a header holding every standard value without reading the fields
    # one by one: it must agree with them on headers one or two bytes off, anywhere
    import random

    rng = random.Random(7)
    for _ in range(20_000):
        data = bytearray(base_elf[:rng.choice((64, 80, len(base_elf)))])
        for _ in range(rng.randrange(3)):
            data[rng.randrange(64)] = rng.randrange(256)
        each = [f for f in FIXED_FIELDS if f.broken(bytes(data))]
        assert broken_fields(bytes(data)) == each, bytes(data[:64]).hex()


def test_a_job_files_every_stride_under_the_cause_too(base_elf: bytes, tmp_path) -> None:
    """A fuzzing job judges a signature's fields once, on its confirming executor, and files
    later inputs of that signature by what the first showed (triage boots each)."""
    from fuzz.harness import Job, JobConfig

    job = Job(JobConfig(kernel="seed", out=str(tmp_path)))
    for stride in (0, 40, 48, 0):
        job.run_input(set_header(base_elf, phentsize=stride))
    assert job.stats.harness_errors == 0
    assert list(job.stats.findings) == [CAUSE]
    assert job.stats.findings[CAUSE].count == 4
    # the hang (stalled under the watchdog) and the misread table: one judgement each
    assert {sig.split(" | ")[0]: list(fields) for sig, fields in job._causes.items()} == {
        "hang": ["e_phentsize"], "vaddr-corruption": ["e_phentsize"]}
    # an input the job keeps as the smallest reproducer is judged by itself, as triage
    # judges it; one only counted may be judged by an earlier input's
    job = Job(JobConfig(kernel="seed", out=str(tmp_path / "again")))
    job.run_input(set_header(base_elf, phentsize=40) + bytes(64))
    job.run_input(set_header(base_elf, phentsize=48) + bytes(64))
    job.run_input(set_header(base_elf, phentsize=48))
    assert job.stats.findings[CAUSE].count == 3
    kept, result = job._unwritten[CAUSE]
    assert len(kept) == len(base_elf)
    assert "earlier input" not in result.findings[0].evidence[1]


def test_a_job_judges_between_runs_what_it_would_judge_at_once(base_elf: bytes,
                                                               tmp_path) -> None:
    """libFuzzer times each input's callback: a job whose mutator runs between inputs judges
    their crashes there (a hang confirmed, a cause booted again, a bucket written), with the
    same outcome, run numbers and times as when judged at once."""
    from fuzz.harness import Job, JobConfig

    inputs = [set_header(base_elf, phentsize=s) for s in (0, 40, 48, 0)] + [
        base_elf, set_header(base_elf, phentsize=40) + bytes(64)]
    at_once = Job(JobConfig(kernel="seed", out=str(tmp_path / "at-once")))
    between = Job(JobConfig(kernel="seed", out=str(tmp_path / "between")))
    between.defer_findings = True
    for i, data in enumerate(inputs):
        for job in (at_once, between):
            job.run_input(data, now=100.0 + i)
            job.stats.execs += 1  # as the callback counts them
    # while the runs were timed: nothing judged, nothing booted again, nothing written
    assert between.stats.findings == {} and between._confirmer is None
    assert (tmp_path / "at-once" / "solutions").exists()
    assert not (tmp_path / "between" / "solutions").exists()
    between.judge_pending()
    assert between._pending == [] and between.stats.harness_errors == 0
    assert at_once.stats.findings and between.stats.findings == at_once.stats.findings
    assert between.stats.first_class == at_once.stats.first_class
    assert between._causes == at_once._causes
    assert {k: v[0] for k, v in between._unwritten.items()} == \
        {k: v[0] for k, v in at_once._unwritten.items()}


def test_an_input_a_job_keeps_is_judged_by_itself_whatever_another_showed(
        base_elf: bytes, tmp_path) -> None:
    """An earlier input of a signature may have shown a broken field not to be its cause
    (its crash stayed with the field put right). An input of that signature that the job
    keeps is still judged by itself, as triage will judge it: a job's bucket that triage
    files elsewhere is a finding lost between them."""
    from fuzz.harness import Job, JobConfig

    data = set_header(base_elf, phentsize=40)
    raw = Executor(load_profile("seed"), causes=False).run(data)
    assert raw.signature != CAUSE
    job = Job(JobConfig(kernel="seed", out=str(tmp_path)))
    job._causes[raw.signature] = {"e_phentsize": None}  # what an earlier input had shown
    job.run_input(data)
    assert job.stats.harness_errors == 0
    assert list(job.stats.findings) == [CAUSE]


def test_a_job_judges_a_stalled_input_against_its_full_budget_run(tmp_path) -> None:
    """The watchdog stops some hangs in another function of their loop than the profile's
    budget does. A stalled input whose header the job judges for a cause is judged against
    its full-budget run, as triage judges it: against the watchdog's signature, a field that
    changes nothing (e_version here) looked like the cause of the hang."""
    from pathlib import Path

    from fuzz.harness import WATCHDOG, Job, JobConfig

    hang = (Path(__file__).parents[1] / "workers" / "data" / "watchdog-hang.elf").read_bytes()
    data = set_header(hang, version=2)
    seed = load_profile("seed")
    stopped = Executor(seed, watchdog=WATCHDOG, causes=False)
    early = stopped.run(data)
    assert stopped.stalled_at and early.signature is not None
    triage = Executor(seed, snapshot=False).run(data)
    assert triage.signature == CAUSE
    # the watchdog's stop, confirmed with the full budget
    job = Job(JobConfig(kernel="seed", out=str(tmp_path), cycles_to_budget=False))
    job._seen.add(early.signature)  # an earlier input of that signature was confirmed
    job.run_input(data)
    assert job.stats.harness_errors == 0
    assert list(job.stats.findings) == [CAUSE]
    # as jobs run by default: the loop is an exact cycle, which the job's own run takes to
    # the full budget, and files alike with no second boot of the input to confirm it
    job = Job(JobConfig(kernel="seed", out=str(tmp_path / "to-budget")))
    job._seen.add(early.signature)
    boots: list[bytes] = []
    full_budget = job._full_budget
    job._full_budget = lambda d: boots.append(d) or full_budget(d)  # type: ignore[method-assign]
    job.run_input(data)
    assert job.stats.harness_errors == 0 and job.executor.stalled_at == 0
    assert list(job.stats.findings) == [CAUSE]
    assert data not in boots  # only the input put right (the cause judged) was booted
