"""The parser's fast paths build exactly what attrs' own constructors and the lenient path build."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import scaled_examples
from voiceapi import BalanceDeduction, TaskStatus, Voice, VoiceTask
from voiceapi._decode import _new_balance, _new_task, _new_voice, parse_task, parse_task_list

RECORD: dict[str, Any] = {
    "task_id": "930801301486305328", "task_status": "succeed", "task_status_msg": "",
    "task_info": {"external_task_id": "ext-1"},
    "task_result": {"voices": [{"voice_id": "829824295735410756", "voice_name": "v",
                                "trial_url": "https://x/t.mp3", "owned_by": "929",
                                "status": "succeed"}]},
    "created_at": 1790605869865, "updated_at": 1790605869999,
    "final_unit_deduction": "0.05", "final_balance_deduction": {"quota": "0", "list_price": "1"},
}


def _expected(raw: dict[str, Any]) -> VoiceTask:
    v = raw["task_result"]["voices"][0]
    return VoiceTask(
        "930801301486305328", TaskStatus.SUCCEED, "", "ext-1",
        [Voice(v["voice_id"], v["voice_name"], v["trial_url"], v["owned_by"], v["status"])],
        datetime.fromtimestamp(raw["created_at"] / 1000, timezone.utc),
        datetime.fromtimestamp(raw["updated_at"] / 1000, timezone.utc),
        "0.05", BalanceDeduction("0", "1"), "succeed")


def test_fast_constructors_equal_attrs_constructors_and_stay_frozen() -> None:
    built = _new_task("1", TaskStatus.FAILED, "m", None, [], None, None, None, None, "failed",
                      None, None)
    assert type(built) is VoiceTask
    assert built == VoiceTask("1", TaskStatus.FAILED, "m", raw_status="failed")
    assert repr(built) == repr(VoiceTask("1", TaskStatus.FAILED, "m", raw_status="failed"))
    assert attrs.asdict(_new_voice("7", "n", "u", "o", None)) == attrs.asdict(
        Voice("7", "n", "u", "o"))
    assert _new_balance("1", "2") == BalanceDeduction("1", "2")
    for obj in (built, _new_voice("7", "", "", "", None), _new_balance("", "")):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            attrs.evolve(obj).__setattr__("quota", "x")
        assert copy.deepcopy(obj) == obj


def test_well_formed_record_matches_the_model_built_by_hand() -> None:
    assert parse_task(RECORD) == _expected(RECORD)
    assert parse_task(RECORD).updated_at != parse_task(RECORD).created_at


def test_equal_stamps_share_one_datetime_and_keep_their_value() -> None:
    raw = {**RECORD, "updated_at": RECORD["created_at"]}
    task = parse_task(raw)
    assert task.updated_at == task.created_at == \
        datetime.fromtimestamp(RECORD["created_at"] / 1000, timezone.utc)


def _slots(task: VoiceTask) -> tuple[Any, Any]:
    """What the two stamp slots hold right now, read past the lazy descriptors."""
    from voiceapi import _models
    return (_models.SLOTS["created_at"].__get__(task),
            _models.SLOTS["updated_at"].__get__(task))


def test_each_stamp_is_built_on_its_first_read_and_stored() -> None:
    from voiceapi._models import _PENDING

    task = parse_task(RECORD)
    assert _slots(task) == (_PENDING, _PENDING)  # the fast path built no datetime
    assert task.updated_at == datetime.fromtimestamp(1790605869.999, timezone.utc)
    assert _slots(task)[0] is _PENDING  # the other one waits for its own first read
    assert task.created_at == datetime.fromtimestamp(1790605869.865, timezone.utc)
    created, updated = _slots(task)
    assert created is task.created_at and updated is task.updated_at  # built once, stored
    same = parse_task({**RECORD, "updated_at": RECORD["created_at"]})
    assert same.created_at == same.updated_at


@pytest.mark.parametrize("read", [
    repr, attrs.asdict, attrs.astuple, copy.copy, copy.deepcopy,
    lambda t: attrs.evolve(t, task_status_msg="x"),
    lambda t: __import__("pickle").loads(__import__("pickle").dumps(t)),
    lambda t: __import__("voiceapi._decode", fromlist=["converter"]).converter.unstructure(t),
], ids=["repr", "asdict", "astuple", "copy", "deepcopy", "evolve", "pickle", "unstructure"])
def test_every_way_of_reading_a_pending_task_sees_datetimes(read: Any) -> None:
    from voiceapi._models import _PENDING

    expected = _expected(RECORD)
    out = read(parse_task(RECORD))
    assert "pending" not in repr(out) and _PENDING not in _flatten(out)
    assert out == read(expected) or (read is repr and out == repr(expected))


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, VoiceTask):
        return [value.created_at, value.updated_at]
    return [value]


def test_a_pending_task_equals_the_task_built_by_hand_both_ways() -> None:
    assert parse_task(RECORD) == _expected(RECORD)
    assert _expected(RECORD) == parse_task(RECORD)  # the other side's __eq__ reads too
    assert parse_task(RECORD) != _expected({**RECORD, "updated_at": 1})


def test_threads_reading_one_pending_task_all_see_the_same_values() -> None:
    import threading

    def read(task: VoiceTask, start: threading.Barrier, seen: list[tuple[Any, Any]]) -> None:
        start.wait(timeout=10)
        seen.append((task.created_at, task.updated_at))

    for _ in range(20):
        task = parse_task(RECORD)
        seen: list[tuple[Any, Any]] = []
        start = threading.Barrier(8)

        threads = [threading.Thread(target=read, args=(task, start, seen)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert len(seen) == 8 and set(seen) == {(_expected(RECORD).created_at,
                                                 _expected(RECORD).updated_at)}


def test_models_built_by_hand_keep_whatever_stamps_they_were_given() -> None:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    task = VoiceTask("1", TaskStatus.SUCCEED, created_at=when)
    assert task.created_at is when and task.updated_at is None
    odd = VoiceTask("1", TaskStatus.SUCCEED, created_at=5)  # type: ignore[arg-type]
    assert odd.created_at == 5  # an int given by hand is not taken for milliseconds


@pytest.mark.parametrize(("field", "value", "attr", "expected"), [
    ("voice_name", 12, "voice_name", "12"),
    ("status", 3, "status", "3"),
    ("owned_by", None, "owned_by", ""),
    ("voice_id", 829824295735410756, "voice_id", "829824295735410756"),
])
def test_odd_voice_fields_leave_the_fast_path_and_stay_lenient(
        field: str, value: Any, attr: str, expected: Any) -> None:
    voice = dict(RECORD["task_result"]["voices"][0], **{field: value})
    raw = {**RECORD, "task_result": {"voices": [voice]}}
    assert getattr(parse_task(raw).voices[0], attr) == expected


@pytest.mark.parametrize(("created", "expected"), [
    (10**30, None), (-(10**30), None), ("1790605869865",
                                        datetime.fromtimestamp(1790605869.865, timezone.utc)),
    (True, None), (1790605869865.0, datetime.fromtimestamp(1790605869.865, timezone.utc)),
])
def test_odd_stamps_stay_lenient(created: Any, expected: datetime | None) -> None:
    task = parse_task({**RECORD, "created_at": created, "updated_at": created})
    assert task.created_at == expected
    assert task.updated_at == expected


def test_numeric_money_in_the_balance_is_its_decimal_text() -> None:
    raw = {**RECORD, "final_balance_deduction": {"quota": 0.05, "list_price": 0}}
    assert parse_task(raw).final_balance_deduction == BalanceDeduction("0.05", "0")


def test_page_of_fast_records_equals_the_records_one_by_one() -> None:
    page = [dict(RECORD, task_id=str(i)) for i in range(1, 31)]
    assert parse_task_list(page) == [parse_task(r) for r in page]


@pytest.mark.parametrize("info", [{"external_task_id": 42}, {"external_task_id": ""}, {},
                                  None, "ext", {"external_task_id": None}])
def test_odd_task_info_is_read_as_before(info: Any) -> None:
    expected = "42" if isinstance(info, dict) and info.get("external_task_id") == 42 else None
    assert parse_task({**RECORD, "task_info": info}).external_task_id == expected


def test_shared_balances_are_equal_values_and_the_table_stays_bounded() -> None:
    from voiceapi import _decode
    tasks = [parse_task({**RECORD, "final_balance_deduction": {"quota": str(i),
                                                                "list_price": "0"}})
             for i in range(2 * _decode._BALANCE_CACHE_SIZE)]
    assert [t.final_balance_deduction for t in tasks] == [
        BalanceDeduction(str(i), "0") for i in range(2 * _decode._BALANCE_CACHE_SIZE)]
    assert len(_decode._BALANCES) <= _decode._BALANCE_CACHE_SIZE


def test_models_built_by_the_twin_are_true_instances_of_the_model() -> None:
    import pickle

    task = parse_task(RECORD)
    assert type(task) is VoiceTask and type(task.voices[0]) is Voice
    assert isinstance(task, VoiceTask) and attrs.has(type(task))
    assert pickle.loads(pickle.dumps(task)) == task
    assert attrs.evolve(task, task_status_msg="x").task_status_msg == "x"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        task.voices[0].__setattr__("voice_id", "x")
    with pytest.raises(AttributeError):
        task.__dict__  # noqa: B018 - slotted: the twin added no instance dict


def test_a_layout_the_twin_cannot_take_falls_back_to_slot_descriptors() -> None:
    from voiceapi._decode import _fast_constructor

    @attrs.frozen  # keeps its __weakref__ slot: __class__ assignment is refused
    class WithWeakref:
        a: str
        b: int = 0

    build = _fast_constructor(WithWeakref)
    assert "set0" in build.__code__.co_names
    assert build("x", 2) == WithWeakref("x", 2) and type(build("x", 2)) is WithWeakref


# Values a server (or a caller's own dict) might put in any field: every JSON type, the odd
# Python ones, and edge cases of the right type (blank ids, huge or negative stamps).
_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True), st.text(max_size=5), st.sampled_from(["", "  ", "succeed",
                                                                      "0", "1790605869865"]),
    st.just([]), st.just({}), st.just(b"x"),
    st.lists(st.dictionaries(st.sampled_from(["voice_id", "voice_name", "status"]),
                             st.one_of(st.none(), st.text(max_size=3), st.integers()),
                             max_size=3), max_size=2),
)


def _mutations() -> st.SearchStrategy[dict[str, Any]]:
    """The common record with a few fields replaced or removed, top level or nested."""
    voice_keys = list(RECORD["task_result"]["voices"][0])
    top = st.dictionaries(st.sampled_from(sorted(RECORD)), st.one_of(st.just(KeyError), _ODD),
                          max_size=3)
    nested = st.dictionaries(st.sampled_from(voice_keys), st.one_of(st.just(KeyError), _ODD),
                             max_size=2)
    balance = st.one_of(st.none(), st.dictionaries(st.sampled_from(["quota", "list_price"]),
                                                   _ODD, max_size=2))

    def build(changes: dict[str, Any], voice_changes: dict[str, Any],
              bal: dict[str, Any] | None) -> dict[str, Any]:
        voice = dict(RECORD["task_result"]["voices"][0])
        for key, value in voice_changes.items():
            voice.pop(key) if value is KeyError else voice.__setitem__(key, value)
        raw = {**RECORD, "task_result": {"voices": [voice]}}
        if bal is not None:
            raw["final_balance_deduction"] = {**RECORD["final_balance_deduction"], **bal}
        for key, value in changes.items():
            raw.pop(key) if value is KeyError else raw.__setitem__(key, value)
        return raw

    return st.builds(build, top, nested, balance)


def _outcome(parse: Any, raw: Any) -> Any:
    try:
        task = parse(raw)
    except Exception as exc:  # compared below, not swallowed
        return type(exc)
    # Field by field with exact types (raw_status is outside equality), and the voices' types.
    return ([(getattr(task, f.name), type(getattr(task, f.name)))
             for f in attrs.fields(VoiceTask)],
            [[(getattr(v, f.name), type(getattr(v, f.name))) for f in attrs.fields(Voice)]
             for v in task.voices])


@settings(max_examples=scaled_examples(300), deadline=None)
@given(_mutations())
def test_the_fast_path_reads_every_record_as_the_lenient_path_does(raw: dict[str, Any]) -> None:
    from voiceapi._decode import _structure_task_lenient, _structure_task_record

    assert _outcome(_structure_task_record, raw) == _outcome(_structure_task_lenient, raw)


@pytest.mark.parametrize("raw", [None, [], "task", 7, [("task_id", "1")]])
def test_records_that_are_not_objects_fail_the_same_on_both_paths(raw: Any) -> None:
    from voiceapi._decode import _structure_task_lenient, _structure_task_record

    assert _outcome(_structure_task_record, raw) == _outcome(_structure_task_lenient, raw)


def test_a_known_status_keeps_the_shared_text_not_the_pages_copy() -> None:
    import json

    # A decoded page holds its own string objects; a tracked task should not keep them alive.
    for raw in json.loads(json.dumps([RECORD, {**RECORD, "task_status_msg": 5}])):
        task = parse_task(raw)
        assert task.raw_status == "succeed" and task.raw_status is TaskStatus.SUCCEED.value


def test_subclasses_and_match_statements_see_the_stamps() -> None:
    @attrs.frozen
    class Mine(VoiceTask):
        extra: int = 0

    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    mine = Mine("1", TaskStatus.SUCCEED, created_at=when, extra=3)
    assert mine.created_at is when and mine.updated_at is None and mine.extra == 3
    match parse_task(RECORD):
        case VoiceTask(created_at=created, updated_at=updated):
            assert (created, updated) == (_expected(RECORD).created_at,
                                          _expected(RECORD).updated_at)
        case _:
            raise AssertionError("no match")
