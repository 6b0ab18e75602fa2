"""Client-side validation and model decoding (tolerant of what the API may add)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

import voiceapi
from voiceapi._custom_voices import build_create_body
from voiceapi._decode import parse_task, parse_task_list, parse_voices
from voiceapi._validation import path_segment

URL = "https://cdn.example.com/a/sample.mp3"


def test_twenty_cjk_characters_pass_twenty_one_fail() -> None:
    assert build_create_body(voice_name="声" * 20, voice_url=URL)["voice_name"] == "声" * 20
    with pytest.raises(voiceapi.ValidationError, match="21 characters"):
        build_create_body(voice_name="声" * 21, voice_url=URL)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"voice_name": "", "voice_url": URL}, "empty"),
    ({"voice_name": "   ", "voice_url": URL}, "empty"),
    ({"voice_name": 5, "voice_url": URL}, "string"),
    ({"voice_name": "a\nb", "voice_url": URL}, "control"),
    ({"voice_name": "a"}, "exactly one"),
    ({"voice_name": "a", "voice_url": URL, "video_id": "830460928805724256"}, "exactly one"),
    ({"voice_name": "a", "voice_url": "ftp://x/a.mp3"}, "http"),
    ({"voice_name": "a", "voice_url": "file:///etc/passwd.wav"}, "http"),
    ({"voice_name": "a", "voice_url": "https://[::1/a.mp3"}, "not a valid URL"),
    ({"voice_name": "a", "voice_url": "https://x:99999/a.mp3"}, "not a valid URL"),
    ({"voice_name": "a", "voice_url": "https://:80/a.mp3"}, "host"),
    ({"voice_name": "a", "voice_url": "https://"}, "http"),
    ({"voice_name": "a", "voice_url": "https://x/" + "a" * 2100}, "too long"),
    ({"voice_name": "a", "voice_url": URL, "callback_url": "https://[zz]/cb"}, "callback_url"),
    ({"voice_name": "a", "voice_url": "https://x/a.mp3 x"}, "valid URL"),
    ({"voice_name": "a", "video_id": "abc"}, "digits"),
    ({"voice_name": "a", "voice_url": URL, "callback_url": "javascript:x"}, "callback_url"),
    ({"voice_name": "a", "voice_url": URL, "external_task_id": "x" * 200}, "longer"),
    ({"voice_name": "a", "voice_url": URL, "external_task_id": "a\x00b"}, "control"),
])
def test_create_validation(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(voiceapi.ValidationError, match=needle):
        build_create_body(**kwargs)


@pytest.mark.parametrize("url", [
    "https://x/a.MP3", "http://x/a.wav", "https://x/a.mp4?sig=1", "https://x/a.MOV#t",
    # Signed and CDN URLs often have no extension: the server judges the media, not us.
    "https://bucket.s3.amazonaws.com/uploads/7f3a9c?X-Amz-Signature=abc&X-Amz-Expires=600",
    "https://cdn.example.com/media/12345", "https://x/a.ogg", "http://[::1]:8080/sample",
])
def test_accepted_media_urls(url: str) -> None:
    assert build_create_body(voice_name="a", voice_url=url)["voice_url"] == url


def test_body_never_contains_nulls_and_always_an_external_id() -> None:
    body = build_create_body(voice_name="a", voice_url=URL, video_id="", callback_url=None)
    assert set(body) == {"voice_name", "voice_url", "external_task_id"}
    assert None not in body.values()
    other = build_create_body(voice_name="a", voice_url=URL)
    assert body["external_task_id"] != other["external_task_id"]
    mine = build_create_body(voice_name="a", video_id="830460928805724256",
                             external_task_id="mine-1")
    assert mine == {"voice_name": "a", "video_id": "830460928805724256",
                    "external_task_id": "mine-1"}


@pytest.mark.parametrize(("raw", "encoded"), [
    ("930801301486305328", "930801301486305328"),
    ("../x", "..%2Fx"),
    ("a/b?c#d", "a%2Fb%3Fc%23d"),
    ("声音", "%E5%A3%B0%E9%9F%B3"),
])
def test_ids_are_one_path_segment(raw: str, encoded: str) -> None:
    assert path_segment(raw) == encoded


@pytest.mark.parametrize("raw", [".", ".."])
def test_dot_ids_are_rejected(raw: str) -> None:
    with pytest.raises(voiceapi.ValidationError):
        path_segment(raw)


FULL = {
    "task_id": "930801301486305328", "task_status": "succeed", "task_status_msg": "",
    "task_info": {"external_task_id": "my-voice-001"},
    "task_result": {"voices": [{"voice_id": "930801338081615883", "voice_name": "Custom Voice",
                                "trial_url": "https://cdn/trial.wav", "owned_by": "42",
                                "status": "succeed"}]},
    "final_unit_deduction": "0.05", "final_balance_deduction": {"quota": "0", "list_price": "0"},
    "created_at": 1790605869865, "updated_at": 1790605878865, "brand_new_field": [1, 2],
}


def test_task_is_flattened_and_typed() -> None:
    task = parse_task(FULL)
    assert task.task_status is voiceapi.TaskStatus.SUCCEED
    assert task.external_task_id == "my-voice-001"
    assert task.voice_id == "930801338081615883"
    assert task.voices == [voiceapi.Voice("930801338081615883", "Custom Voice",
                                          "https://cdn/trial.wav", "42", "succeed")]
    assert task.created_at == datetime(2026, 9, 28, 14, 31, 9, 865000, tzinfo=timezone.utc)
    assert task.final_unit_deduction == "0.05"
    assert task.is_terminal


def test_minimal_and_tolerant_shapes() -> None:
    task = parse_task({"task_id": 930801301486305328, "task_status": "succeeded",
                       "task_result": None, "task_info": None, "task_status_msg": None})
    assert task.task_id == "930801301486305328"  # a numeric id still becomes the same string
    assert task.task_status is voiceapi.TaskStatus.SUCCEED
    assert task.voices == [] and task.external_task_id is None
    odd = parse_task({"task_id": "1", "task_status": "queued"})
    assert odd.task_status is voiceapi.TaskStatus.UNKNOWN and not odd.is_terminal


@pytest.mark.parametrize("raw", [
    None, [], "x", 5, {}, {"task_status": "submitted"}, {"task_id": None},
    {"task_id": {"a": 1}, "task_status": "submitted"}, {"task_id": True},
    {"task_id": "", "task_status": "succeed"}, {"task_id": "  ", "task_status": "succeed"},
    {"task_id": 1.5, "task_status": "succeed"}, {"task_id": ["1"], "task_status": "succeed"},
])
def test_only_a_record_without_a_usable_task_id_is_unreadable(raw: Any) -> None:
    with pytest.raises(voiceapi.UnexpectedResponseError, match="task"):
        parse_task(raw, request_id="rid-9")


def test_lists() -> None:
    assert parse_task_list(None) == []
    assert len(parse_task_list([FULL, FULL])) == 2
    with pytest.raises(voiceapi.UnexpectedResponseError):
        parse_task_list({"items": []})
    presets = parse_voices([{"task_id": "1", "task_status": "succeed", "task_result": {
        "voices": [{"voice_id": "9", "voice_name": "Narrator", "trial_url": "u",
                    "owned_by": "kling"}]}}])
    assert presets[0].is_preset and presets[0].voice_name == "Narrator"


def test_models_are_frozen() -> None:
    task = parse_task(FULL)
    with pytest.raises(AttributeError):
        task.task_id = "2"  # type: ignore[misc]
