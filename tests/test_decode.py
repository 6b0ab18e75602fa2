"""Reading answers right: not-found and duplicate ids by message, lenient task parsing, and
errors that carry their HTTP status and request id in one place."""

from __future__ import annotations

import ast
import copy
import json
import logging
import pickle
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import voiceapi
from tests.conftest import FAST_RETRY, envelope, scaled_examples, serve
from voiceapi._decode import (
    converter,
    decode_envelope,
    is_duplicate_external_id,
    is_not_found,
    parse_task,
    parse_task_list,
    parse_voices,
)
from voiceapi._validation import identifier, page_params, path_segment
from voiceapi.testing import KlingEmulator

# --- not found / duplicate external id ----------------------------------------------------------

REAL_NOT_FOUND = "Task not found by id/external id: 930801301486305328"
REAL_DUPLICATE = "External_task_id my-voice-001 already exists"


def _invalid(message: str, code: int | None = 1201, status: int = 400) -> voiceapi.APIError:
    return voiceapi.InvalidRequestError(message, code=code, http_status=status)


@pytest.mark.parametrize(("exc", "not_found", "duplicate"), [
    (_invalid(REAL_NOT_FOUND), True, False),
    (_invalid("task not found"), True, False),
    (_invalid("TASK NOT FOUND by external id: x"), True, False),
    (_invalid("Task does not exist"), True, False),
    (_invalid(REAL_NOT_FOUND, code=1200), True, False),
    (_invalid("Requested resource does not exist", code=1203, status=404), True, False),
    (_invalid("", code=1203, status=404), True, False),
    (_invalid("Not Found", code=None, status=404), True, False),  # a bare 404, no envelope
    # Every other 1201 is some other parameter problem: never "not found".
    (_invalid("pageSize must be between 1 and 500"), False, False),
    (_invalid("voice_id is required"), False, False),
    (_invalid("voice_url not found"), False, False),
    (_invalid("Voice not found for id: 9"), False, False),
    (_invalid("callback_url host not found"), False, False),
    (_invalid(REAL_DUPLICATE), False, True),
    (_invalid("external_task_id already exists: my-voice-001"), False, True),
    (_invalid("Duplicate external_task_id"), False, True),
    (_invalid("External_task_id task not found already exists"), False, True),
    (_invalid("voice_name already exists: Narrator"), False, False),
    (_invalid("Invalid request method", code=1202, status=404), False, False),
    (_invalid(REAL_DUPLICATE, code=1203, status=404), True, False),
    # Right words, wrong kind of error.
    (voiceapi.ServerError(REAL_NOT_FOUND, code=5000, http_status=500), False, False),
    (voiceapi.APIError(REAL_NOT_FOUND, code=None, http_status=404), False, False),
    (voiceapi.ServerError(REAL_DUPLICATE, code=5000, http_status=500), False, False),
    (voiceapi.RateLimitError(REAL_NOT_FOUND, code=1303, http_status=429), False, False),
    (voiceapi.UnexpectedResponseError(REAL_NOT_FOUND, http_status=404), False, False),
    (ValueError(REAL_NOT_FOUND), False, False),
    (KeyError("task not found"), False, False),
])
def test_not_found_and_duplicate_are_told_by_message(
        exc: BaseException, not_found: bool, duplicate: bool) -> None:
    assert is_not_found(exc) is not_found
    assert is_duplicate_external_id(exc) is duplicate


@pytest.mark.parametrize(("status", "body", "not_found", "duplicate"), [
    (400, {"code": 1201, "message": REAL_NOT_FOUND}, True, False),
    (400, {"code": 1201, "message": REAL_DUPLICATE}, False, True),
    (400, {"code": 1201, "message": "pageSize must be between 1 and 500"}, False, False),
    (404, {"code": 1203, "message": "resource does not exist"}, True, False),
    (404, None, True, False),
    (400, {"code": 1201}, False, False),  # no message at all: only "Kling error 1201"
    (400, {"code": 1201, "message": ["Task not found"]}, False, False),
])
def test_recognition_works_on_what_the_decoder_raises(
        status: int, body: Any, not_found: bool, duplicate: bool) -> None:
    raw = b"<html>404</html>" if body is None else json.dumps({**body, "request_id": "r"}).encode()
    with pytest.raises(voiceapi.InvalidRequestError) as info:
        decode_envelope(status, {}, raw)
    assert is_not_found(info.value) is not_found
    assert is_duplicate_external_id(info.value) is duplicate


def test_message_that_is_not_a_string_is_never_a_match() -> None:
    exc = _invalid("x")
    exc.message = None  # type: ignore[assignment]  # a caller-made error, badly filled
    assert not is_not_found(exc) and not is_duplicate_external_id(exc)


# --- lenient parsing: one odd field never loses a page ------------------------------------------

GOOD: dict[str, Any] = {
    "task_id": "930801301486305328", "task_status": "succeed", "task_status_msg": "",
    "task_info": {"external_task_id": "my-voice-001"},
    "task_result": {"voices": [{"voice_id": "930801338081615883", "voice_name": "Custom Voice",
                                "trial_url": "https://cdn/trial.wav", "owned_by": "42",
                                "status": "succeed"}]},
    "final_unit_deduction": "0.05", "final_balance_deduction": {"quota": "0", "list_price": "1"},
    "created_at": 1790605869865, "updated_at": 1790605878865,
}
WHEN = datetime(2026, 9, 28, 14, 31, 9, 865000, tzinfo=timezone.utc)
VOICE = voiceapi.Voice("930801338081615883", "Custom Voice", "https://cdn/trial.wav", "42",
                       "succeed")


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one field (``a.b`` for nested) set to value, or removed for ``...``."""
    record = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    target = record
    for key in parents:
        target = target[key]
    if value is ...:
        del target[leaf]
    else:
        target[leaf] = value
    return record


ODD_FIELDS: list[tuple[str, Any, str, Any]] = [
    # (field, odd value, attribute read, expected)
    ("final_unit_deduction", 0.05, "final_unit_deduction", "0.05"),
    ("final_unit_deduction", 5, "final_unit_deduction", "5"),
    ("final_unit_deduction", 1e-05, "final_unit_deduction", "0.00001"),
    ("final_unit_deduction", None, "final_unit_deduction", None),
    ("final_unit_deduction", True, "final_unit_deduction", None),
    ("final_unit_deduction", {"x": 1}, "final_unit_deduction", None),
    ("final_unit_deduction", float("nan"), "final_unit_deduction", None),
    ("final_balance_deduction", {"quota": 0, "list_price": 0.35},
     "final_balance_deduction", voiceapi.BalanceDeduction("0", "0.35")),
    ("final_balance_deduction", {"quota": None}, "final_balance_deduction",
     voiceapi.BalanceDeduction("", "")),
    ("final_balance_deduction", "0.05", "final_balance_deduction", None),
    ("final_balance_deduction", None, "final_balance_deduction", None),
    ("created_at", 1790605869865.0, "created_at", WHEN),
    ("created_at", "1790605869865", "created_at", WHEN),
    ("created_at", " 1790605869865 ", "created_at", WHEN),
    ("created_at", "yesterday", "created_at", None),
    ("created_at", 10**30, "created_at", None),
    ("created_at", 10**400, "created_at", None),
    ("created_at", "1e400", "created_at", None),
    ("created_at", float("inf"), "created_at", None),
    ("created_at", True, "created_at", None),
    ("created_at", [1], "created_at", None),
    ("created_at", ..., "created_at", None),
    ("task_result", None, "voices", []),
    ("task_result", "x", "voices", []),
    ("task_result", ..., "voices", []),
    ("task_result.voices", None, "voices", []),
    ("task_result.voices", "nope", "voices", []),
    ("task_result.voices", [5, "x", None, {}, {"voice_id": ""}, GOOD["task_result"]["voices"][0]],
     "voices", [VOICE]),
    ("task_result.voices", GOOD["task_result"]["voices"][0], "voices", [VOICE]),
    ("task_result.voices", [{"voice_id": 7, "owned_by": 42, "voice_name": None}],
     "voices", [voiceapi.Voice("7", "", "", "42", None)]),
    ("task_result.voices", [{"voice_id": "7", "status": "deleted"}],
     "voices", [voiceapi.Voice("7", status="deleted")]),
    ("task_info", None, "external_task_id", None),
    ("task_info", "x", "external_task_id", None),
    ("task_info", {"external_task_id": ""}, "external_task_id", None),
    ("task_info", {"external_task_id": 42}, "external_task_id", "42"),
    ("task_info", {"external_task_id": {"a": 1}}, "external_task_id", None),
    ("task_status", "queued", "task_status", voiceapi.TaskStatus.UNKNOWN),
    ("task_status", 3, "task_status", voiceapi.TaskStatus.UNKNOWN),
    ("task_status", None, "task_status", voiceapi.TaskStatus.UNKNOWN),
    ("task_status", ..., "task_status", voiceapi.TaskStatus.UNKNOWN),
    ("task_status", "SUCCEED", "task_status", voiceapi.TaskStatus.SUCCEED),
    ("task_status", "succeeded", "task_status", voiceapi.TaskStatus.SUCCEED),
    ("task_status_msg", 5, "task_status_msg", "5"),
    ("task_status_msg", None, "task_status_msg", ""),
    ("task_id", 930801301486305328, "task_id", "930801301486305328"),
]


@pytest.mark.parametrize(("field", "value", "attr", "expected"), ODD_FIELDS)
def test_one_odd_field_keeps_the_record_and_the_page(
        field: str, value: Any, attr: str, expected: Any) -> None:
    page = [GOOD, _with(field, value), GOOD]
    tasks = parse_task_list(page)
    assert [t.task_id for t in tasks] == ["930801301486305328"] * 3
    assert getattr(tasks[1], attr) == expected
    # Everything else of the odd record is read as usual.
    reference = parse_task(GOOD)
    for other in ("task_id", "task_status", "external_task_id", "voices", "created_at",
                  "final_unit_deduction", "final_balance_deduction"):
        if other != attr:
            assert getattr(tasks[1], other) == getattr(reference, other), other


def test_numbers_too_long_to_print_lose_only_their_field() -> None:
    huge = 10**5000  # str() refuses it (int_max_str_digits); JSON cannot carry it, Python can
    task = parse_task(_with("final_unit_deduction", huge)
                      | {"task_info": {"external_task_id": huge}, "task_result": {"voices": [
                          {"voice_id": "7", "owned_by": huge}, {"voice_id": huge}]}})
    assert (task.final_unit_deduction, task.external_task_id) == (None, None)
    assert task.voices == [voiceapi.Voice("7")]
    with pytest.raises(voiceapi.UnexpectedResponseError, match="no usable task_id"):
        parse_task({"task_id": huge})


def test_the_voice_hook_refuses_an_unusable_entry() -> None:
    with pytest.raises(TypeError):
        converter.structure({"voice_name": "no id"}, voiceapi.Voice)


def test_skipped_voice_entries_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voiceapi"):
        task = parse_task(_with("task_result.voices", [5, {"voice_name": "no id"}]))
    assert task.voices == []
    # One line per record, with the count (many junk entries must not flood the log).
    lines = [r.getMessage() for r in caplog.records if "voice_id" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 voice entries" in lines[0] and "(first: 5)" in lines[0]


@pytest.mark.parametrize(("status", "raw"), [
    ("queued", "queued"), ("succeeded", "succeeded"), ("succeed", "succeed"), (3, "3"),
    (None, None), ({"a": 1}, None),
])
def test_raw_status_keeps_what_the_server_sent(status: Any, raw: str | None) -> None:
    task = parse_task(_with("task_status", status))
    assert task.raw_status == raw
    # raw_status is not part of equality: two spellings of one state are the same task.
    assert task == parse_task(_with("task_status", status if status != "succeeded" else "succeed"))


def test_unknown_status_is_not_terminal() -> None:
    task = parse_task(_with("task_status", "archived"))
    assert task.task_status is voiceapi.TaskStatus.UNKNOWN and not task.is_terminal


@pytest.mark.parametrize(("index", "bad"), [(0, {"task_status": "succeed"}), (1, None),
                                             (2, {"task_id": ""}), (1, [GOOD])])
def test_a_record_without_task_id_fails_the_page_naming_its_index(index: int, bad: Any) -> None:
    page: list[Any] = [GOOD, GOOD, GOOD]
    page[index] = bad
    with pytest.raises(voiceapi.UnexpectedResponseError, match=f"#{index} ") as info:
        parse_task_list(page, request_id="rid-7")
    assert info.value.request_id == "rid-7"
    if not isinstance(bad, dict):
        with pytest.raises(voiceapi.UnexpectedResponseError, match=f"#{index} "):
            parse_voices(page)


def test_preset_voices_need_no_task_id() -> None:
    preset = {"task_result": {"voices": [{"voice_id": "p1", "voice_name": "Narrator",
                                          "owned_by": "kling"}]}}
    voices = parse_voices([preset, GOOD, {"task_id": "", **preset}])
    assert [v.voice_id for v in voices] == ["p1", VOICE.voice_id, "p1"]
    assert voices[0].is_preset


@pytest.mark.parametrize("value", ["succeed", "deleted", "DELETED", " deleted", None, 5,
                                   ["x"]])
def test_voice_status_is_kept(value: Any) -> None:
    voice = parse_task(_with("task_result.voices", [{"voice_id": "1", "status": value}])).voice
    assert voice is not None
    expected = value if isinstance(value, str) or value is None else ("5" if value == 5 else None)
    assert voice.status == expected
    assert voice.is_deleted is (isinstance(value, str) and value.strip().lower() == "deleted")


def test_absent_voice_status_is_none() -> None:
    raw = _with("task_result.voices", [{"voice_id": "1", "voice_name": "n"}])
    assert parse_task(raw).voices == [voiceapi.Voice("1", "n")]
    assert parse_task(raw).voices[0].status is None


def test_deleted_voices_stay_in_the_list() -> None:
    page = [_with("task_result.voices", [{"voice_id": str(i), "status": s}])
            for i, s in enumerate(["succeed", "deleted", "succeed"])]
    page = [{**p, "task_id": str(100 + i)} for i, p in enumerate(page)]
    voices = [t.voice for t in parse_task_list(page)]
    assert [(v.voice_id, v.is_deleted) for v in voices if v is not None] == \
        [("0", False), ("1", True), ("2", False)]


# --- one pass, inside the converter ------------------------------------------------------------

def test_the_converter_is_the_parser() -> None:
    task = converter.structure(GOOD, voiceapi.VoiceTask)
    assert task == parse_task(GOOD)
    assert task == voiceapi.VoiceTask(
        "930801301486305328", voiceapi.TaskStatus.SUCCEED, "", "my-voice-001", [VOICE],
        WHEN, datetime(2026, 9, 28, 14, 31, 18, 865000, tzinfo=timezone.utc), "0.05",
        voiceapi.BalanceDeduction("0", "1"))
    assert converter.structure(GOOD["task_result"]["voices"][0], voiceapi.Voice) == VOICE


def test_parsing_does_not_touch_the_input() -> None:
    raw = copy.deepcopy(GOOD)
    parse_task_list([raw, raw])
    assert raw == GOOD


# --- property tests: any JSON value, and odd fields on every record -------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["task_id", "task_status", "task_info", "task_result", "voices",
                         "voice_id", "voice_name", "owned_by", "status", "created_at",
                         "external_task_id", "final_unit_deduction", "quota", "x"]),
        children, max_size=5),
    max_leaves=16)

ODD_RECORD = st.fixed_dictionaries(
    {"task_id": st.one_of(st.from_regex(r"[0-9]{1,19}", fullmatch=True),
                          st.integers(min_value=0, max_value=10**19))},
    optional={"task_status": JSON, "task_status_msg": JSON, "task_info": JSON,
              "task_result": st.one_of(JSON, st.fixed_dictionaries({"voices": JSON})),
              "created_at": JSON, "updated_at": JSON, "final_unit_deduction": JSON,
              "final_balance_deduction": JSON})


@settings(deadline=None)  # example count: the active hypothesis profile
@given(raw=JSON)
def test_any_json_gives_tasks_or_a_typed_error(raw: Any) -> None:
    for parse in (parse_task, parse_task_list, parse_voices):
        try:
            result = parse(raw)
        except voiceapi.VoiceAPIError:
            continue
        items = result if isinstance(result, list) else [result]
        assert all(isinstance(i, (voiceapi.VoiceTask, voiceapi.Voice)) for i in items)


# Each example is a page of deeply nested odd records: 60 (600 thorough) keep it within budget.
@settings(max_examples=scaled_examples(60), deadline=None)
@given(page=st.lists(ODD_RECORD, max_size=5))
def test_records_with_an_id_are_never_lost_whatever_their_other_fields(
        page: list[dict[str, Any]]) -> None:
    tasks = parse_task_list(page)
    assert [t.task_id for t in tasks] == [str(r["task_id"]) for r in page]
    for task in tasks:
        assert isinstance(task.task_status, voiceapi.TaskStatus)
        assert isinstance(task.task_status_msg, str)
        assert all(isinstance(v.voice_id, str) and v.voice_id for v in task.voices)
        assert task.final_unit_deduction is None or isinstance(task.final_unit_deduction, str)
        assert task.created_at is None or task.created_at.tzinfo is timezone.utc


WELL_FORMED_VOICE = st.fixed_dictionaries(
    {"voice_id": st.from_regex(r"[0-9]{1,19}", fullmatch=True)},
    optional={"voice_name": st.text(max_size=20), "trial_url": st.text(max_size=20),
              "owned_by": st.text(max_size=5), "status": st.sampled_from(["succeed", "deleted"])})
WELL_FORMED = st.fixed_dictionaries(
    {"task_id": st.from_regex(r"[0-9]{1,19}", fullmatch=True),
     "task_status": st.sampled_from(["submitted", "processing", "succeed", "failed"]),
     "task_status_msg": st.text(max_size=20),
     "task_info": st.fixed_dictionaries({}, optional={
         "external_task_id": st.text(min_size=1, max_size=20)}),
     "task_result": st.fixed_dictionaries({"voices": st.lists(WELL_FORMED_VOICE, max_size=2)}),
     "created_at": st.integers(0, 4_102_444_800_000),
     "updated_at": st.integers(0, 4_102_444_800_000)},
    optional={"final_unit_deduction": st.from_regex(r"[0-9]{1,3}\.[0-9]{1,2}", fullmatch=True),
              "final_balance_deduction": st.fixed_dictionaries(
                  {"quota": st.just("0"), "list_price": st.just("1.5")})})


def _reference(raw: dict[str, Any]) -> voiceapi.VoiceTask:
    """The plain reading of a well-formed record, field by field, as the docs describe it."""
    def ms(value: int) -> datetime:
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc)

    balance = raw.get("final_balance_deduction")
    return voiceapi.VoiceTask(
        task_id=raw["task_id"], task_status=voiceapi.TaskStatus(raw["task_status"]),
        task_status_msg=raw["task_status_msg"],
        external_task_id=raw["task_info"].get("external_task_id"),
        voices=[voiceapi.Voice(**v) for v in raw["task_result"]["voices"]],
        created_at=ms(raw["created_at"]), updated_at=ms(raw["updated_at"]),
        final_unit_deduction=raw.get("final_unit_deduction"),
        final_balance_deduction=None if balance is None else voiceapi.BalanceDeduction(**balance),
        raw_status=raw["task_status"])


@settings(deadline=None)  # example count: the active hypothesis profile
@given(raw=WELL_FORMED)
def test_the_one_pass_parser_equals_the_plain_reading(raw: dict[str, Any]) -> None:
    parsed = parse_task(raw)
    assert parsed == _reference(raw)
    assert parsed.raw_status == raw["task_status"]  # not compared by ==


# --- errors in one place -----------------------------------------------------------------------

ALL_ERRORS = [
    voiceapi.ValidationError("bad"),
    voiceapi.ClientClosedError("closed"),
    voiceapi.APIError("m", code=1, http_status=400, request_id="r"),
    voiceapi.AuthenticationError("a", code=1004, http_status=401, request_id="r",
                                 server_time=5.0),
    voiceapi.ConflictError("c", code=1201, http_status=400, existing_task_id="9"),
    voiceapi.RateLimitError("r", code=1303, http_status=429, retry_after=2.0),
    voiceapi.ServerError("s", http_status=502),
    voiceapi.APIConnectionError("reset", maybe_sent=False),
    voiceapi.APITimeoutError("slow"),
    voiceapi.UnexpectedResponseError("garbage", http_status=200, request_id="r"),
    voiceapi.TaskFailedError(parse_task(_with("task_status", "failed"))),
    voiceapi.WaitTimeoutError("1", 2.0, parse_task(GOOD)),
    voiceapi.WaitTimeoutError("1", 2.0, None),
    voiceapi.WebhookVerificationError("sig"),
    voiceapi.EventLoopError("loop"),
]


@pytest.mark.parametrize("exc", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_every_error_has_status_and_request_id_and_survives_pickle(exc: Exception) -> None:
    assert isinstance(exc, voiceapi.VoiceAPIError)
    status, rid = exc.http_status, exc.request_id  # no isinstance chain needed
    assert status is None or isinstance(status, int)
    assert rid is None or isinstance(rid, str)
    copy_ = pickle.loads(pickle.dumps(exc))
    assert type(copy_) is type(exc) and str(copy_) == str(exc)
    assert vars(copy_) == vars(exc)


def test_api_error_fields_stay() -> None:
    exc = voiceapi.InvalidRequestError("x", code=1201, http_status=400, request_id="r")
    assert (exc.code, exc.message, exc.http_status, exc.request_id) == (1201, "x", 400, "r")
    assert voiceapi.ValidationError("x").http_status is None


def test_task_errors_carry_the_task() -> None:
    failed = parse_task(_with("task_status", "failed") | {"task_status_msg": "too short"})
    exc = voiceapi.TaskFailedError(failed)
    assert exc.task is failed and "too short" in str(exc) and failed.task_id in str(exc)
    timeout = voiceapi.WaitTimeoutError("9", 1.5, parse_task(_with("task_status", "queued")))
    assert "last status: unknown (queued)" in str(timeout)
    plain = voiceapi.WaitTimeoutError("9", 1.5, parse_task(_with("task_status", "processing")))
    assert str(plain).endswith("(last status: processing)")


def test_errors_do_not_import_the_models() -> None:
    source = Path(voiceapi.__file__).with_name("_errors.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.level > 0}
    assert imported == set(), imported


# --- page ranges and ids checked before sending ------------------------------------------------

@pytest.mark.parametrize(("page_num", "page_size"), [
    (0, 30), (1, 0), (1, 1001), (1001, 30), (-1, 30), (True, 30), (1, False), ("1", 30),
    (1, "30"), (1.0, 30), (1, None),
])
def test_page_ranges_are_checked(page_num: Any, page_size: Any) -> None:
    with pytest.raises(voiceapi.ValidationError):
        page_params(page_num, page_size)


def test_page_range_edges_pass() -> None:
    assert page_params(1, 1) == {"pageNum": "1", "pageSize": "1"}
    assert page_params(1000, 1000) == {"pageNum": "1000", "pageSize": "1000"}


@pytest.mark.parametrize("kwargs", [{"page_num": 0}, {"page_size": 1001}, {"page_size": True},
                                    {"page_num": "2"}])
async def test_a_bad_page_never_reaches_the_network(kwargs: dict[str, Any]) -> None:
    # Nothing listens on port 9: a request that was sent would fail as a connection error.
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9",
                                         max_retries=0) as client:
        with pytest.raises(voiceapi.ValidationError):
            await client.custom_voices.list(**kwargs)
        with pytest.raises(voiceapi.ValidationError):
            await client.preset_voices.list(**kwargs)
        if "page_size" in kwargs:
            with pytest.raises(voiceapi.ValidationError):
                async for _ in client.custom_voices.iter_all(page_size=kwargs["page_size"]):
                    pass


@pytest.mark.parametrize(("raw", "expected"), [
    ("930801301486305328", "930801301486305328"), (930801301486305328, "930801301486305328"),
    ("my-voice_001", "my-voice_001"), ("١٢٣", "١٢٣"),
])
def test_identifier_fast_and_slow_paths_agree(raw: Any, expected: str) -> None:
    assert identifier(raw, "task_id") == expected


@pytest.mark.parametrize("raw", ["1" * 129, "", "   ", "12\n3", True, None, 1.5])
def test_identifier_refusals_hold_for_digit_ids_too(raw: Any) -> None:
    with pytest.raises(voiceapi.ValidationError):
        identifier(raw, "task_id")


def test_non_ascii_digits_are_still_encoded() -> None:
    assert path_segment("١٢٣") == "%D9%A1%D9%A2%D9%A3"
    assert path_segment("²") == "%C2%B2"


# --- wait() on a status this SDK does not know ------------------------------------------------

@pytest.fixture
async def shifting_server() -> AsyncIterator[tuple[str, list[str]]]:
    """Answers each GET with the next status of ``statuses`` (the last one repeats)."""
    statuses: list[str] = []
    seen: list[int] = [0]

    async def get(request: web.Request) -> web.Response:
        status = statuses[min(seen[0], len(statuses) - 1)]
        seen[0] += 1
        return web.json_response(envelope(_with("task_status", status)))

    app = web.Application()
    app.router.add_get("/v1/general/custom-voices/{ref}", get)
    async with serve(app) as url:
        yield url, statuses


async def test_wait_keeps_waiting_through_an_unknown_status(
        shifting_server: tuple[str, list[str]]) -> None:
    url, statuses = shifting_server
    statuses += ["queued", "archiving", "succeed"]
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=url,
                                         retry_policy=FAST_RETRY) as client:
        task = await client.custom_voices.wait("930801301486305328", timeout=10,
                                               poll_interval=0.01)
    assert task.task_status is voiceapi.TaskStatus.SUCCEED and task.voice == VOICE


async def test_wait_on_an_unknown_status_ends_at_its_deadline(
        shifting_server: tuple[str, list[str]]) -> None:
    url, statuses = shifting_server
    statuses.append("queued")
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=url,
                                         retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.WaitTimeoutError) as info:
            await client.custom_voices.wait("930801301486305328", timeout=0.2,
                                            poll_interval=0.01)
    assert info.value.task is not None and info.value.task.raw_status == "queued"
    assert info.value.task.task_status is voiceapi.TaskStatus.UNKNOWN


# --- every reading the emulator can play is read right end to end --------------------------

@pytest.mark.parametrize("readings", [
    {}, {"numeric_money": True}, {"profile": "strict-real"}, {"deleted_voices": "drop"},
    {"voice_status": False}, {"numeric_money": True, "list_order": "oldest"},
], ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()) or "default")
async def test_get_and_list_read_every_emulator_reading(readings: dict[str, Any]) -> None:
    async with KlingEmulator(task_seconds=0.05, **readings) as emu, voiceapi.AsyncVoiceClient(
            api_key=emu.api_key, base_url=emu.base_url, retry_policy=FAST_RETRY) as client:
        kept, gone = [await client.custom_voices.wait(
            await client.custom_voices.create(voice_name=name, voice_url=emu.sample_url()),
            timeout=10, poll_interval=0.02) for name in ("kept", "gone")]
        assert gone.voice_id is not None
        await client.custom_voices.delete(gone.voice_id)
        listed = {t.task_id: t for t in await client.custom_voices.list(page_size=30)}
        fetched = {t.task_id: await client.custom_voices.get(t.task_id) for t in (kept, gone)}
    status = "succeed" if emu.voice_status else None
    for view in (listed, fetched):
        assert set(view) == {kept.task_id, gone.task_id}
        for task in view.values():
            assert task.task_status is voiceapi.TaskStatus.SUCCEED
            assert task.final_unit_deduction == "0.05"  # sent as 0.05 or "0.05", read the same
            assert task.final_balance_deduction == voiceapi.BalanceDeduction("0", "0")
            assert task.created_at is not None and task.updated_at is not None
            assert abs(task.created_at.timestamp() - time.time()) < 600  # ms read as ms
        assert view[kept.task_id].voices == [kept.voice] and kept.voice is not None
        assert kept.voice.status == status and not kept.voice.is_deleted
        deleted = view[gone.task_id].voices
        if emu.deleted_voices == "drop":
            assert deleted == []
        else:
            assert [v.voice_id for v in deleted] == [gone.voice_id]
            assert deleted[0].is_deleted is emu.voice_status


def test_many_unusable_voice_entries_make_one_warning_with_their_count(
        caplog: pytest.LogCaptureFixture) -> None:
    from voiceapi._decode import parse_task

    raw = {"task_id": "1", "task_status": "succeed",
           "task_result": {"voices": [{}] * 1000 + [{"voice_id": "v1"}, 7]}}
    with caplog.at_level("WARNING", logger="voiceapi"):
        task = parse_task(raw)
    assert [v.voice_id for v in task.voices] == ["v1"]
    assert len(caplog.records) == 1
    assert "skipped 1001 voice entries" in caplog.text and "(first: {})" in caplog.text
