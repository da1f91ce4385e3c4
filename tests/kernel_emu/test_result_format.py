"""The Result's JSON contract: a schema with a version, from_json ∘ to_json = identity on every
golden input, enums for verdicts, classes and stop reasons, and clear refusals."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import cache
from pathlib import Path

import jsonschema
import pytest

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.result import (
    RESULT_VERSION,
    CrashClass,
    Result,
    ResultFormatError,
    StopReason,
    Verdict,
)
from tests.kernel_emu import golden

SCHEMA = json.loads((Path(__file__).parents[2] / "kernel_emu" / "result.schema.json")
                    .read_text())


@cache
def _results() -> list[Result]:
    out = []
    for kernel in golden.KERNELS:
        executor = Executor(load_profile(kernel))
        out += [executor.run(data) for _, data in golden.inputs()]
    return out


def test_every_result_matches_the_schema_and_reads_back_as_itself() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    seen = set()
    for result in _results():
        raw = result.to_json()
        errors = sorted(validator.iter_errors(raw), key=str)
        assert not errors, (result.input_sha256, errors[0].message)
        text = json.dumps(raw, sort_keys=True)
        back = Result.loads(text)
        assert back == result
        assert json.dumps(back.to_json(), sort_keys=True) == text
        assert type(back.verdict) is Verdict and type(back.stop) is StopReason
        assert back.crash_class is None or type(back.crash_class) is CrashClass
        seen.add((back.verdict, back.crash_class))
    assert len(seen) >= 8  # the inputs reach every verdict and many classes


def test_the_dict_is_what_asdict_makes_of_the_result_and_shares_no_container() -> None:
    """`to_json` puts the dict together itself (asdict took milliseconds a Result): every
    field as `dataclasses.asdict` gives it, and changing what it returns leaves the Result
    as it was."""
    for result in _results():
        want = asdict(result)
        if want["kernel_load_base"] is None:
            del want["kernel_load_base"]
        want["findings"] = [f.to_json() for f in result.findings]
        want["version"] = RESULT_VERSION
        raw = result.to_json()
        assert raw == want
        before = json.dumps(raw, sort_keys=True)
        for value in raw.values():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value[0]["spoiled"] = 1
            elif isinstance(value, (list, dict)):
                value.clear()
        assert json.dumps(result.to_json(), sort_keys=True) == before


def test_a_result_stored_before_the_version_field_still_loads() -> None:
    crash = next(r for r in _results() if r.verdict == "crash")
    raw = crash.to_json()
    del raw["version"]
    assert Result.from_json(raw) == crash


def test_a_newer_format_is_refused_with_a_clear_message() -> None:
    raw = _results()[0].to_json()
    raw["version"] = RESULT_VERSION + 1
    with pytest.raises(ResultFormatError, match="newer than this farm reads"):
        Result.from_json(raw)


@pytest.mark.parametrize("text", [b"", b"[]", b"{}", b"\xff\xfe", b'{"verdict": "ok"}'])
def test_what_is_not_a_result_is_refused(text: bytes) -> None:
    with pytest.raises(ResultFormatError, match="not a Result"):
        Result.loads(text)


@pytest.mark.parametrize(("key", "value"), [("verdict", "maybe"), ("stop", "tea-break"),
                                            ("crash_class", "bad-luck")])
def test_an_unknown_enum_value_is_refused(key: str, value: str) -> None:
    raw = next(r for r in _results() if r.verdict == "crash").to_json()
    raw[key] = value
    with pytest.raises(ResultFormatError, match="not a Result"):
        Result.from_json(raw)
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(raw))


def test_enums_read_as_the_strings_they_were() -> None:
    assert Verdict.CRASH == "crash" and json.dumps([StopReason.UNTIL]) == '["until"]'
    assert f"{CrashClass.HEAP_CORRUPTION}" == "heap-corruption"


def test_the_input_digest_is_the_inputs_sha256_when_read() -> None:
    """A run's Result names its input by SHA-256, taken when first read: in its JSON, a
    copy, a comparison, or set as a string outright."""
    import hashlib
    from dataclasses import replace

    executor = Executor(load_profile("seed"))
    for _, data in list(golden.inputs())[:6]:
        want = hashlib.sha256(data).hexdigest()
        result = executor.run(data)
        assert replace(result).input_sha256 == want
        assert result.to_json()["input_sha256"] == want
        assert Result.loads(result.dumps()) == result
        assert replace(result, input_sha256="elsewhere").input_sha256 == "elsewhere"
    bare = Result(Verdict.OK, None, None, [], 0, "", [], [], [], "", 0, StopReason.HALT)
    assert bare.input_sha256 == "" and bare.to_json()["input_sha256"] == ""
