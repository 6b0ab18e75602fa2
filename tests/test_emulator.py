"""The emulator's own conformance to kling-api.md, checked with raw aiohttp (no SDK code)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.conftest import serve
from voiceapi.testing import KlingEmulator, connection_info, sign_webhook
from voiceapi.testing import main as run_emulator_main
from voiceapi.testing import serve as serve_emulator
from voiceapi.testing._pytest_plugin import fail_on_internal_errors

CV = "/v1/general/custom-voices"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, emu: KlingEmulator, method: str, path: str, *,
               token: str | None = None, **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = kw.pop("headers", {})
    headers.setdefault("Authorization", f"Bearer {token or emu.api_key}")
    async with http.request(method, emu.base_url + path, headers=headers, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


def _jwt(emu: KlingEmulator, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": emu.access_key, "exp": now + 1800, "nbf": now - 5, **claims}
    return jwt.encode(payload, emu.secret_key, algorithm="HS256")


async def test_success_envelope_and_create_shape(emu: KlingEmulator,
                                                  http: aiohttp.ClientSession) -> None:
    status, body = await call(http, emu, "POST", CV, json={
        "voice_name": "Custom Voice", "voice_url": emu.sample_url(11.3), "video_id": "",
        "callback_url": "", "external_task_id": "my-voice-001"})
    assert status == 200
    assert body["code"] == 0 and body["message"] == "SUCCEED"
    uuid.UUID(body["request_id"])
    data = body["data"]
    assert set(data) == {"task_id", "task_info", "task_status", "created_at", "updated_at"}
    assert data["task_id"].isdigit() and len(data["task_id"]) == 18
    assert data["task_info"] == {"external_task_id": "my-voice-001"}
    assert data["task_status"] == "submitted"
    assert abs(data["created_at"] - time.time() * 1000) < 60_000  # milliseconds


async def test_task_lifecycle_and_lookup_by_either_id(http: aiohttp.ClientSession) -> None:
    # Only advance() moves this task: with the fixture's 0.1 s task a loaded machine could take
    # longer than the 25 ms "submitted" phase between the create and the first GET.
    async with KlingEmulator(task_seconds=3600) as emu:
        _, created = await call(http, emu, "POST", CV, json={
            "voice_name": "v", "voice_url": emu.sample_url(10), "external_task_id": "ext-7"})
        task_id = created["data"]["task_id"]
        _, first = await call(http, emu, "GET", f"{CV}/{task_id}")
        assert first["data"]["task_status"] == "submitted"
        assert first["data"]["task_result"] == {"voices": []}
        emu.advance(emu.processing_after)
        _, mid = await call(http, emu, "GET", f"{CV}/ext-7")
        assert mid["data"]["task_status"] == "processing" and mid["data"]["task_id"] == task_id
        emu.advance(emu.task_seconds)
        _, done = await call(http, emu, "GET", f"{CV}/x?external_task_id=ext-7")
    data = done["data"]
    assert data["task_status"] == "succeed" and data["task_status_msg"] == ""
    (voice,) = data["task_result"]["voices"]
    assert set(voice) == {"voice_id", "voice_name", "trial_url", "owned_by", "status"}
    assert voice["status"] == "succeed"
    assert voice["owned_by"] == emu.account_id and voice["voice_name"] == "v"
    assert data["final_unit_deduction"] == "0.05"
    assert data["updated_at"] > data["created_at"]


async def test_unknown_task_is_400_1201(emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, emu, "GET", f"{CV}/nope")
    assert status == 400 and body["code"] == 1201
    assert body["message"] == "Task not found by id/external id: nope"
    assert "data" not in body


@pytest.mark.parametrize(("headers", "code"), [
    ({"Authorization": ""}, 1001),
    ({"Authorization": "Basic abc"}, 1002),
    ({"Authorization": "Bearer garbage"}, 1002),
])
async def test_auth_failures(emu: KlingEmulator, http: aiohttp.ClientSession,
                             headers: dict[str, str], code: int) -> None:
    status, body = await call(http, emu, "GET", CV, headers=headers)
    assert (status, body["code"]) == (401, code) and "data" not in body


async def test_jwt_time_claims(emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    now = int(time.time())
    assert (await call(http, emu, "GET", CV, token=_jwt(emu)))[0] == 200
    assert (await call(http, emu, "GET", CV, token=_jwt(emu, nbf=now + 600)))[1]["code"] == 1003
    assert (await call(http, emu, "GET", CV, token=_jwt(emu, exp=now - 10)))[1]["code"] == 1004
    wrong = jwt.encode({"iss": emu.access_key, "exp": now + 60}, "x" * 32, algorithm="HS256")
    assert (await call(http, emu, "GET", CV, token=wrong))[1]["code"] == 1002
    stranger = _jwt(emu, iss="someone-else")
    assert (await call(http, emu, "GET", CV, token=stranger))[1]["code"] == 1002


async def test_strict_auth_collapses_to_1002(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(strict_auth=True) as emu:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer " + _jwt(
                emu, exp=int(time.time()) - 10)}):
            assert (await call(http, emu, "GET", CV, headers=headers))[1]["code"] == 1002


@pytest.mark.parametrize(("body", "needle"), [
    ({"voice_url": "https://x/a.mp3"}, "voice_name"),
    ({"voice_name": "x" * 21, "voice_url": "https://x/a.mp3"}, "voice_name"),
    ({"voice_name": "a"}, "voice_url"),
    ({"voice_name": "a", "voice_url": "", "video_id": ""}, "voice_url"),
    ({"voice_name": "a", "voice_url": "https://x/a.mp3", "video_id": "123"}, "exclusive"),
    ({"voice_name": "a", "voice_url": 5}, "voice_url"),
    ({"voice_name": "a", "video_id": "12ab"}, "video_id"),
    ({"voice_name": "a", "video_id": "\u0661\u0662\u0663"}, "video_id"),  # Arabic-Indic digits
    ({"voice_name": "a", "video_id": "12\u00b2"}, "video_id"),  # superscript two
])
async def test_create_validation_is_400_1201_naming_the_field(
        emu: KlingEmulator, http: aiohttp.ClientSession, body: dict[str, Any], needle: str
) -> None:
    status, answer = await call(http, emu, "POST", CV, json=body)
    assert (status, answer["code"]) == (400, 1201)
    assert needle in answer["message"]
    assert emu.task_count == 0


async def test_duplicate_external_id_is_rejected(emu: KlingEmulator,
                                                 http: aiohttp.ClientSession) -> None:
    body = {"voice_name": "a", "voice_url": emu.sample_url(), "external_task_id": "same"}
    assert (await call(http, emu, "POST", CV, json=body))[0] == 200
    status, answer = await call(http, emu, "POST", CV, json=body)
    assert (status, answer["code"]) == (400, 1201) and emu.task_count == 1
    assert answer["message"] == "External_task_id same already exists"


@pytest.mark.parametrize(("kw", "code"), [
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 1200),
    ({"json": [1, 2]}, 1200),
    ({"data": b'{"voice_name":"a"}', "headers": {"Content-Type": "text/plain"}}, 1200),
    ({"json": {"voice_name": "a", "voice_url": "https://x/" + "a" * 100_000 + ".mp3"}}, 1200),
])
async def test_malformed_requests_get_envelopes(emu: KlingEmulator, http: aiohttp.ClientSession,
                                                kw: dict[str, Any], code: int) -> None:
    status, body = await call(http, emu, "POST", CV, **kw)
    assert (status, body["code"]) == (400, code)


@pytest.mark.parametrize(("method", "path", "code"), [
    ("DELETE", CV, 1202), ("PUT", "/v1/general/delete-voices", 1202),
    ("POST", "/v1/general/presets-voices", 1202), ("GET", "/v1/general/nothing", 1203),
    ("GET", "/", 1203),
])
async def test_wrong_method_and_unknown_path(emu: KlingEmulator, http: aiohttp.ClientSession,
                                             method: str, path: str, code: int) -> None:
    status, body = await call(http, emu, method, path)
    assert (status, body["code"]) == (404, code)


async def test_list_is_newest_first_and_paged(emu: KlingEmulator,
                                              http: aiohttp.ClientSession) -> None:
    emu.concurrency = 100
    for i in range(5):
        await call(http, emu, "POST", CV, json={"voice_name": f"v{i}",
                                                "voice_url": emu.sample_url()})
    _, page1 = await call(http, emu, "GET", CV, params={"pageNum": "1", "pageSize": "2"})
    _, page3 = await call(http, emu, "GET", CV, params={"pageNum": "3", "pageSize": "2"})
    _, page4 = await call(http, emu, "GET", CV, params={"pageNum": "4", "pageSize": "2"})
    names = [t["task_result"] and emu._tasks[t["task_id"]].voice_name for t in page1["data"]]
    assert names == ["v4", "v3"]
    assert len(page3["data"]) == 1 and page4["data"] == []
    _, default = await call(http, emu, "GET", CV)
    assert len(default["data"]) == 5
    for bad in ({"pageSize": "0"}, {"pageSize": "1001"}, {"pageNum": "x"}, {"pageNum": "0"}):
        status, body = await call(http, emu, "GET", CV, params=bad)
        assert (status, body["code"]) == (400, 1201)


async def test_presets_shape(emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    _, body = await call(http, emu, "GET", "/v1/general/presets-voices",
                         params={"pageSize": "1000"})
    assert len(body["data"]) == 48
    first = body["data"][0]
    assert "task_info" not in first and "final_unit_deduction" not in first
    (voice,) = first["task_result"]["voices"]
    assert voice["owned_by"] == "kling" and len(voice["voice_name"]) <= 20


async def test_delete_rules(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(deleted_voices="drop") as emu:
        await _check_delete_rules(emu, http)


async def _check_delete_rules(emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    _, created = await call(http, emu, "POST", CV, json={"voice_name": "v",
                                                         "voice_url": emu.sample_url()})
    emu.advance(1)
    _, got = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
    voice_id = got["data"]["task_result"]["voices"][0]["voice_id"]
    status, body = await call(http, emu, "POST", "/v1/general/delete-voices",
                              json={"voice_id": voice_id})
    assert status == 200 and body["data"]["task_status"] == "succeed"
    _, again = await call(http, emu, "POST", "/v1/general/delete-voices",
                          json={"voice_id": voice_id})
    assert again["code"] == 1201 and "already" in again["message"]
    _, preset = await call(http, emu, "POST", "/v1/general/delete-voices",
                           json={"voice_id": emu.preset_ids()[0]})
    assert preset["code"] == 1201
    _, after = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
    assert after["data"]["task_result"]["voices"] == []


async def test_concurrency_limit_is_429_1303(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(concurrency=2, task_seconds=60) as emu:
        for i in range(2):
            assert (await call(http, emu, "POST", CV, json={
                "voice_name": f"v{i}", "voice_url": emu.sample_url()}))[0] == 200
        status, body = await call(http, emu, "POST", CV, json={
            "voice_name": "v3", "voice_url": emu.sample_url()})
        assert (status, body) == (429, {"code": 1303, "request_id": body["request_id"],
                                        "message": "parallel task over resource pack limit"})
        emu.advance(61)  # both finish: their slots free at once
        assert (await call(http, emu, "POST", CV, json={
            "voice_name": "v3", "voice_url": emu.sample_url()}))[0] == 200
        assert emu.peak_in_progress == 2


@pytest.mark.parametrize(("url", "needle"), [
    ("voice-3s.wav", "between 5s and 30s"), ("voice-31s.wav", "between 5s and 30s"),
])
async def test_media_problems_become_failed_tasks(emu: KlingEmulator,
                                                  http: aiohttp.ClientSession, url: str,
                                                  needle: str) -> None:
    _, created = await call(http, emu, "POST", CV, json={
        "voice_name": "v", "voice_url": f"{emu.base_url}/samples/{url}"})
    emu.advance(1)
    _, got = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
    assert got["data"]["task_status"] == "failed" and needle in got["data"]["task_status_msg"]
    assert got["data"]["task_result"]["voices"] == []


async def test_samples_are_real_wav_files(emu: KlingEmulator,
                                          http: aiohttp.ClientSession) -> None:
    import io
    import wave
    async with http.get(emu.sample_url(7.5)) as resp:
        data = await resp.read()
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnframes() / w.getframerate() == pytest.approx(7.5)


def test_webhook_signature_matches_the_official_vector() -> None:
    body = (b'{"id":"1234567890","status":"succeeded","message":"","create_time":1781080778802,'
            b'"update_time":1781080794151}')
    got = sign_webhook("whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI=", "9876543210",
                       1781080794, body)
    assert got == "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4="


async def test_callbacks_fire_on_each_change(http: aiohttp.ClientSession) -> None:
    received: list[tuple[dict[str, Any], dict[str, str]]] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.json(), dict(request.headers)))
        if len(received) == 2:
            done.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve(app) as hook_base:
        async with KlingEmulator(task_seconds=0.1, webhook_secret="whsec_" + "QUJD" * 8) as emu:
            await call(http, emu, "POST", CV, json={
                "voice_name": "v", "voice_url": emu.sample_url(),
                "callback_url": f"{hook_base}/hook"})
            await asyncio.wait_for(done.wait(), 10)
    statuses = [r["task_status"] for r, _ in received]
    assert statuses == ["processing", "succeed"]
    record, headers = received[1]
    assert record["task_result"]["voices"][0]["voice_name"] == "v"
    assert headers["webhook-signature"].startswith("v1,")


async def test_emulator_options(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(unique_voice_names=True, max_page_size=500, qps=3,
                             deleted_voices="mark", reject_both_sources=False) as emu:
        body = {"voice_name": "same", "voice_url": emu.sample_url(), "video_id": "123"}
        assert (await call(http, emu, "POST", CV, json=body))[0] == 200  # both allowed
        status, answer = await call(http, emu, "POST", CV, json=body)
        assert (status, answer["code"]) == (400, 1201) and "voice_name" in answer["message"]
        status, answer = await call(http, emu, "GET", CV, params={"pageSize": "501"})
        assert answer["code"] in (1201, 1302)
        codes = [(await call(http, emu, "GET", CV))[1]["code"] for _ in range(4)]
        assert 1302 in codes  # more than 3 requests within a second
    async with KlingEmulator(deleted_voices="mark") as emu:
        _, created = await call(http, emu, "POST", CV, json={"voice_name": "v",
                                                             "voice_url": emu.sample_url()})
        emu.advance(1)
        task_id = created["data"]["task_id"]
        _, got = await call(http, emu, "GET", f"{CV}/{task_id}")
        voice_id = got["data"]["task_result"]["voices"][0]["voice_id"]
        await call(http, emu, "POST", "/v1/general/delete-voices", json={"voice_id": voice_id})
        _, after = await call(http, emu, "GET", f"{CV}/{task_id}")
        assert after["data"]["task_result"]["voices"][0]["status"] == "deleted"


@pytest.mark.parametrize("route", ["create", "get", "list", "presets", "delete", "*"])
async def test_faults_can_target_every_route(emu: KlingEmulator, http: aiohttp.ClientSession,
                                             route: str) -> None:
    emu.inject(route, 5001)
    table: dict[str, tuple[str, str, dict[str, Any]]] = {
        "create": (CV, "POST", {"json": {"voice_name": "v", "voice_url": emu.sample_url()}}),
        "get": (f"{CV}/1", "GET", {}), "list": (CV, "GET", {}),
        "presets": ("/v1/general/presets-voices", "GET", {}),
        "delete": ("/v1/general/delete-voices", "POST", {"json": {"voice_id": "1"}}),
        "*": (CV, "GET", {}),
    }
    path, method, kw = table[route]
    status, body = await call(http, emu, method, path, **kw)
    assert (status, body["code"]) == (503, 5001)
    with pytest.raises(ValueError):
        emu.inject("nowhere", 5000)
    with pytest.raises(ValueError):
        emu.inject("get", "explode")


# --- readings of the API (kling-api.md §11.1) -----------------------------------------------

async def _create(http: aiohttp.ClientSession, emu: KlingEmulator, name: str,
                  ext: str | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"voice_name": name, "voice_url": emu.sample_url()}
    if ext is not None:
        body["external_task_id"] = ext
    return await call(http, emu, "POST", CV, json=body)


async def _deleted_voice_task(http: aiohttp.ClientSession, emu: KlingEmulator) -> dict[str, Any]:
    """Create a voice, let it succeed, delete it; return the task as the single query shows."""
    _, created = await _create(http, emu, "gone")
    emu.advance(emu.task_seconds + 1)
    task_id = created["data"]["task_id"]
    _, got = await call(http, emu, "GET", f"{CV}/{task_id}")
    voice_id = got["data"]["task_result"]["voices"][0]["voice_id"]
    status, _ = await call(http, emu, "POST", "/v1/general/delete-voices",
                           json={"voice_id": voice_id})
    assert status == 200
    _, after = await call(http, emu, "GET", f"{CV}/{task_id}")
    _, listed = await call(http, emu, "GET", CV)
    (in_list,) = [t for t in listed["data"] if t["task_id"] == task_id]
    assert in_list["task_result"] == after["data"]["task_result"]  # list and get agree
    return dict(after["data"])


@pytest.mark.parametrize("size", [500, 1000])
async def test_max_page_size_refuses_larger_pages(http: aiohttp.ClientSession,
                                                  size: int) -> None:
    async with KlingEmulator(max_page_size=size) as emu:
        assert (await call(http, emu, "GET", CV, params={"pageSize": str(size)}))[0] == 200
        status, body = await call(http, emu, "GET", CV, params={"pageSize": str(size + 1)})
        assert (status, body["code"]) == (400, 1201)
        assert body["message"] == f"pageSize must be between 1 and {size}"
        assert emu.count("list", code=1201) == 1


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_list_order_holds_across_pages(http: aiohttp.ClientSession, order: str) -> None:
    async with KlingEmulator(list_order=order, concurrency=50) as emu:
        for i in range(7):
            assert (await _create(http, emu, f"v{i}"))[0] == 200
        seen: list[str] = []
        for page in range(1, 5):
            _, body = await call(http, emu, "GET", CV,
                                 params={"pageNum": str(page), "pageSize": "3"})
            seen += [t["task_id"] for t in body["data"]]
        created = [t["task_id"] for t in emu.tasks()]  # oldest first
        assert seen == (created if order == "oldest" else created[::-1])


async def test_deleted_voices_mark_keeps_the_voice_with_its_status(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator() as emu:  # "mark" is the default
        assert emu.deleted_voices == "mark"
        data = await _deleted_voice_task(http, emu)
    (voice,) = data["task_result"]["voices"]
    assert voice["status"] == "deleted" and data["task_status"] == "succeed"


async def test_deleted_voices_drop_removes_the_voice(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(deleted_voices="drop") as emu:
        data = await _deleted_voice_task(http, emu)
    assert data["task_result"]["voices"] == [] and data["task_status"] == "succeed"


async def test_voice_status_off_sends_voices_without_status(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(voice_status=False) as emu:
        data = await _deleted_voice_task(http, emu)
    (voice,) = data["task_result"]["voices"]  # still listed, but nothing says it is deleted
    assert "status" not in voice and set(voice) == {"voice_id", "voice_name", "trial_url",
                                                    "owned_by"}


@pytest.mark.parametrize("numeric", [False, True])
async def test_numeric_money(http: aiohttp.ClientSession, numeric: bool) -> None:
    async with KlingEmulator(numeric_money=numeric) as emu:
        _, created = await _create(http, emu, "v")
        emu.advance(emu.task_seconds + 1)
        _, got = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
        _, listed = await call(http, emu, "GET", CV)
    data = got["data"]
    assert listed["data"][0]["final_unit_deduction"] == data["final_unit_deduction"]
    if numeric:
        assert data["final_unit_deduction"] == 0.05
        assert data["final_balance_deduction"] == {"quota": 0, "list_price": 0}
        assert isinstance(data["created_at"], str) and data["created_at"].isdigit()
        assert int(data["updated_at"]) >= int(data["created_at"])
    else:
        assert data["final_unit_deduction"] == "0.05"
        assert data["final_balance_deduction"] == {"quota": "0", "list_price": "0"}
        assert isinstance(data["created_at"], int)


async def test_repeated_external_id_refused_by_default(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator() as emu:
        assert (await _create(http, emu, "a", "ext-1"))[0] == 200
        status, body = await _create(http, emu, "b", "ext-1")
        assert (status, body["code"], body["message"]) == (
            400, 1201, "External_task_id ext-1 already exists")
        assert "data" not in body
        assert len(emu.tasks_by_external_id("ext-1")) == 1


async def test_repeated_external_id_accepted_when_not_unique(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(unique_external_ids=False) as emu:
        _, first = await _create(http, emu, "a", "ext-1")
        _, second = await _create(http, emu, "b", "ext-1")
        assert first["code"] == second["code"] == 0
        assert first["data"]["task_id"] != second["data"]["task_id"]
        assert len(emu.tasks_by_external_id("ext-1")) == 2
        _, got = await call(http, emu, "GET", f"{CV}/ext-1")
        assert got["data"]["task_id"] == first["data"]["task_id"]  # the first one is found


async def test_not_found_message_is_the_real_one(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(profile="strict-real") as emu:
        status, body = await call(http, emu, "GET", f"{CV}/ext%2F9")
    assert (status, body["code"]) == (400, 1201)
    assert body["message"] == "Task not found by id/external id: ext/9"


async def test_strict_real_profile_turns_on_every_real_reading(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(profile="strict-real") as emu:
        assert (emu.strict_auth, emu.max_page_size, emu.deleted_voices, emu.voice_status,
                emu.numeric_money, emu.unique_external_ids, emu.check_url_extension) == (
            True, 500, "mark", True, False, True, False)
        assert (await call(http, emu, "GET", CV, headers={"Authorization": ""}))[1]["code"] \
            == 1002
        assert (await call(http, emu, "GET", CV, params={"pageSize": "501"}))[0] == 400
        await _create(http, emu, "a", "ext-1")
        assert (await _create(http, emu, "a", "ext-1"))[1]["message"] == \
            "External_task_id ext-1 already exists"
        data = await _deleted_voice_task(http, emu)
        assert data["task_result"]["voices"][0]["status"] == "deleted"
        assert data["final_unit_deduction"] == "0.05"


async def test_explicit_options_win_over_the_profile() -> None:
    emu = KlingEmulator(profile="strict-real", max_page_size=1000, strict_auth=False,
                        list_order="oldest")
    assert (emu.max_page_size, emu.strict_auth, emu.list_order) == (1000, False, "oldest")
    assert emu.deleted_voices == "mark"


@pytest.mark.parametrize(("kw", "name"), [
    ({"max_page_size": 0}, "max_page_size"), ({"max_page_size": 1001}, "max_page_size"),
    ({"max_page_size": "500"}, "max_page_size"), ({"max_page_size": True}, "max_page_size"),
    ({"list_order": "random"}, "list_order"), ({"deleted_voices": "hide"}, "deleted_voices"),
    ({"voice_status": "yes"}, "voice_status"), ({"numeric_money": 1}, "numeric_money"),
    ({"unique_external_ids": "no"}, "unique_external_ids"), ({"strict_auth": 0}, "strict_auth"),
    ({"check_url_extension": None, "profile": "x"}, "profile"),
    ({"check_url_extension": "off"}, "check_url_extension"),
    ({"pending_voices": "none"}, "pending_voices"),
    ({"profile": "real"}, "profile"), ({"concurrency": 0}, "concurrency"),
    ({"task_seconds": -1}, "task_seconds"), ({"qps": "fast"}, "qps"),
    ({"max_recorded_requests": -1}, "max_recorded_requests"),
])
def test_bad_option_values_name_the_option(kw: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        KlingEmulator(**kw)


# --- inspection and the standalone runner -----------------------------------------------------

async def test_counts_stay_exact_when_the_request_log_is_bounded(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(max_recorded_requests=3) as emu:
        for _ in range(5):
            await call(http, emu, "GET", CV)
        await call(http, emu, "GET", CV, headers={"Authorization": ""})
        assert len(emu.requests) == 3
        assert emu.count() == emu.count("list") == 6
        assert (emu.count("list", code=0), emu.count(code=1001)) == (5, 1)


async def test_stats_route_reports_what_the_server_saw(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(unique_external_ids=False, concurrency=3, task_seconds=60) as emu:
        for name, ext in (("a", "e1"), ("b", "e1"), ("c", "e2"), ("d", "e3")):
            await _create(http, emu, name, ext)
        await call(http, emu, "GET", f"{CV}/nope")
        async with http.get(emu.base_url + "/_emulator/stats") as resp:  # no credentials
            assert resp.status == 200
            stats = await resp.json()
        assert stats == emu.stats()
    assert stats["by_route"] == {"create": 4, "get": 1}
    assert stats["by_route_code"] == {"create": {"0": 3, "1303": 1}, "get": {"1201": 1}}
    assert stats["requests"] == 5  # the stats route itself is not counted
    assert (stats["task_count"], stats["in_progress"], stats["peak_in_progress"]) == (3, 3, 3)
    assert stats["tasks_per_external_id"] == {"1": 1, "2": 1}
    assert stats["repeated_external_ids"] == ["e1"]


async def _read_line(stream: asyncio.StreamReader | None) -> dict[str, Any]:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), 30)
    info: dict[str, Any] = json.loads(line)
    return info


async def test_standalone_runner_in_its_own_process(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voiceapi.testing", "--port", "0", "--api-key", "key-1",
        "--max-page-size", "500", "--concurrency", "1", "--task-seconds", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        info = await _read_line(proc.stdout)
        assert set(info) == {"base_url", "access_key", "secret_key", "api_key"}
        assert info["api_key"] == "key-1" and info["base_url"].startswith("http://127.0.0.1:")
        base, bearer = info["base_url"], {"Authorization": "Bearer key-1"}
        body = {"voice_name": "v", "voice_url": "https://x.test/a-10s.wav"}
        async with http.post(base + CV, json=body, headers=bearer) as resp:
            assert resp.status == 200
        async with http.post(base + CV, json=body, headers=bearer) as resp:
            assert (await resp.json())["code"] == 1303  # --concurrency 1 took effect
        token = jwt.encode({"iss": info["access_key"], "exp": int(time.time()) + 60},
                           info["secret_key"], algorithm="HS256")
        async with http.get(base + CV, params={"pageSize": "501"},
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            assert (resp.status, (await resp.json())["code"]) == (400, 1201)
        async with http.get(base + "/_emulator/stats") as resp:
            stats = await resp.json()
        assert stats["by_route_code"] == {"create": {"0": 1, "1303": 1}, "list": {"1201": 1}}
        assert (stats["task_count"], stats["peak_in_progress"]) == (1, 1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 30)
    assert rc == 0  # SIGTERM is a clean stop
    assert proc.stderr is not None and await proc.stderr.read() == b""


def test_standalone_runner_does_not_need_click() -> None:
    code = ("import sys; sys.modules['click'] = None; "  # any import of click now fails
            "import voiceapi.testing.__main__")
    out = subprocess.run([sys.executable, "-c", code, "--nope"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "unrecognized arguments: --nope" in out.stderr


def test_options_from_args_gives_only_what_was_given() -> None:
    assert KlingEmulator.options_from_args([]) == {}
    opts = KlingEmulator.options_from_args([
        "--port", "0", "--profile", "strict-real", "--max-page-size", "1000",
        "--list-order", "oldest", "--no-voice-status", "--numeric-money",
        "--deleted-voices", "drop", "--webhook-secret", "whsec_QUJD", "--qps", "2.5"])
    assert opts == {"port": 0, "profile": "strict-real", "max_page_size": 1000,
                    "list_order": "oldest", "voice_status": False, "numeric_money": True,
                    "deleted_voices": "drop", "webhook_secret": "whsec_QUJD", "qps": 2.5}
    emu = KlingEmulator(**opts)
    assert (emu.max_page_size, emu.strict_auth, emu.voice_status) == (1000, True, False)
    with pytest.raises(SystemExit):
        KlingEmulator.options_from_args(["--list-order", "random"])


async def test_serve_runs_until_stopped() -> None:
    stop = asyncio.Event()
    seen: list[dict[str, str]] = []

    def announce(emu: KlingEmulator) -> None:
        seen.append(connection_info(emu))
        stop.set()

    await asyncio.wait_for(serve_emulator({"api_key": "k"}, announce=announce, stop=stop), 30)
    assert seen[0]["api_key"] == "k"


def test_main_refuses_bad_values_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_emulator_main(["--max-page-size", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: max_page_size") and err.count("\n") == 1


# --- faults ---------------------------------------------------------------------------------

async def test_commit_then_drop_stores_one_task_and_never_answers(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator() as emu:
        emu.inject("create", "commit_then_drop")
        with pytest.raises(aiohttp.ClientConnectionError):
            await _create(http, emu, "v", "ext-drop")
        assert len(emu.tasks_by_external_id("ext-drop")) == 1 and emu.task_count == 1
        (record,) = emu.requests
        assert (record.route, record.status, record.code, record.external_task_id) == (
            "create", 0, "dropped", "ext-drop")
        assert emu.count("create", code="dropped") == 1
        assert emu.stats()["by_route_code"] == {"create": {"dropped": 1}}
        # The task is there for a reconciling lookup; a resend is refused as a duplicate.
        status, got = await call(http, emu, "GET", f"{CV}/ext-drop")
        assert status == 200 and got["data"]["task_info"]["external_task_id"] == "ext-drop"
        assert (await _create(http, emu, "v", "ext-drop"))[1]["message"] == \
            "External_task_id ext-drop already exists"
        assert emu.task_count == 1


async def test_reset_drops_before_any_work(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator() as emu:
        emu.inject("create", "reset")
        with pytest.raises(aiohttp.ClientConnectionError):
            await _create(http, emu, "v", "ext-r")
        assert emu.task_count == 0 and emu.count("create", code="dropped") == 1


async def test_slow_fault_delays_a_lookup(http: aiohttp.ClientSession) -> None:
    async with KlingEmulator() as emu:
        _, created = await _create(http, emu, "v", "ext-s")
        emu.inject("get", "slow", delay=0.5)
        with pytest.raises(asyncio.TimeoutError):  # the answer comes after the client gave up
            await call(http, emu, "GET", f"{CV}/ext-s",
                       timeout=aiohttp.ClientTimeout(total=0.05))
        status, got = await call(http, emu, "GET", f"{CV}/ext-s")  # the fault was used up
        assert status == 200 and got["data"]["task_id"] == created["data"]["task_id"]


# --- the emulator never hides its own bugs ----------------------------------------------------

def _break(emu: KlingEmulator, method: str, exc: BaseException) -> None:
    """Force an emulator bug: the named handler raises ``exc``."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise exc
    setattr(emu, method, broken)


async def test_internal_error_is_recorded_and_answered_5000(
        emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    _break(emu, "_get", RuntimeError("emulator bug 42"))
    status, body = await call(http, emu, "GET", f"{CV}/123")
    assert (status, body["code"]) == (500, 5000)
    (error,) = emu.internal_errors
    assert error.startswith(f"GET {CV}/123 (get):") and "Traceback" in error
    assert "RuntimeError: emulator bug 42" in error
    with pytest.raises(pytest.fail.Exception, match="emulator bug 42") as failed:
        fail_on_internal_errors(emu)  # what the fixtures run at teardown
    assert "internal error" in str(failed.value)
    emu.internal_errors.clear()  # handled here; the fixture would fail this test otherwise


async def test_a_client_that_goes_away_is_not_an_internal_error(
        emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    _break(emu, "_get", ConnectionResetError("peer gone"))
    assert (await call(http, emu, "GET", f"{CV}/123"))[1]["code"] == 5000
    assert emu.internal_errors == [] and emu.internal_error_report() is None
    fail_on_internal_errors(emu)  # no error: nothing to fail


async def test_callback_bugs_are_recorded_and_callbacks_keep_running(
        http: aiohttp.ClientSession) -> None:
    async with KlingEmulator(task_seconds=0.05) as emu:
        _break(emu, "_deliver", KeyError("callback bug"))
        await call(http, emu, "POST", CV, json={"voice_name": "v", "voice_url": emu.sample_url(),
                                                "callback_url": "http://127.0.0.1:9/hook"})
        for _ in range(200):  # bounded: the ticker runs every few ms
            if emu.internal_errors:
                break
            await asyncio.sleep(0.01)
        assert emu.internal_errors and "KeyError: 'callback bug'" in emu.internal_errors[0]
        assert emu.internal_errors[0].startswith("callbacks:")
        assert emu._ticker is not None and not emu._ticker.done()  # still serving
        emu.internal_errors.clear()


def test_internal_errors_are_bounded() -> None:
    emu = KlingEmulator()
    for i in range(150):
        try:
            raise ValueError(i)
        except ValueError:
            emu._record_internal_error("x")
    assert len(emu.internal_errors) == 100


@pytest.mark.slow
def test_the_plugin_fixture_fails_a_test_that_hit_an_emulator_bug(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent('''
        import sys, urllib.error, urllib.request

        def test_before_any_fixture_use():  # the plugin is loaded, the emulator is not
            assert "aiohttp.web" not in sys.modules
            assert "voiceapi.testing._pytest_plugin" in sys.modules

        def test_uses_the_emulator(kling_emulator):
            def broken(*args, **kwargs):
                raise RuntimeError("emulator bug 77")
            kling_emulator._get = broken
            request = urllib.request.Request(
                kling_emulator.base_url + "/v1/general/custom-voices/1",
                headers={"Authorization": "Bearer " + kling_emulator.api_key})
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as err:
                assert err.code == 500   # the test itself passes...

        def test_clean(kling_emulator):
            assert kling_emulator.internal_errors == []
    '''))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "asyncio_default_fixture_loop_scope=function", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "3 passed, 1 error" in out.stdout  # every test passes; one errors at teardown

    assert "ERROR at teardown of test_uses_the_emulator" in out.stdout
    assert "RuntimeError: emulator bug 77" in out.stdout


def test_importing_the_plugin_does_not_import_the_emulator() -> None:
    code = ("import voiceapi.testing._pytest_plugin, sys; "
            "print('aiohttp.web' in sys.modules, 'voiceapi.testing._emulator' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_the_testing_package_loads_names_on_first_use() -> None:
    import voiceapi.testing as testing

    assert testing.KlingEmulator is KlingEmulator and testing.main is run_emulator_main
    assert set(testing.__all__) <= set(dir(testing))
    with pytest.raises(AttributeError, match="no_such_name"):
        testing.no_such_name  # noqa: B018


# --- hypothesis profiles (tests/conftest.py) --------------------------------------------------

def test_hypothesis_profile_follows_the_environment() -> None:
    from hypothesis import settings

    from tests.conftest import load_hypothesis_profile, scaled_examples

    before = os.environ.get("HYPOTHESIS_PROFILE", "").strip() or "quick"
    assert settings().max_examples == settings.get_profile(before).max_examples
    try:
        assert load_hypothesis_profile({}) == "quick"
        assert (settings().max_examples, settings().deadline) == (200, None)
        assert scaled_examples(12) == 12
        assert load_hypothesis_profile({"HYPOTHESIS_PROFILE": "thorough"}) == "thorough"
        assert settings().max_examples == 2000 and scaled_examples(12) == 120
        with pytest.raises(pytest.UsageError, match="HYPOTHESIS_PROFILE"):
            load_hypothesis_profile({"HYPOTHESIS_PROFILE": "slow"})
    finally:
        load_hypothesis_profile({"HYPOTHESIS_PROFILE": before})


def test_every_python_block_of_the_readme_section_runs(kling_emulator: KlingEmulator) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Testing your code with the emulator", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    for block in blocks:
        namespace: dict[str, Any] = {}
        exec(block, namespace)
        if "test_my_uploader" in namespace:
            asyncio.run(namespace["test_my_uploader"]())
        if "test_sync_code" in namespace:
            namespace["test_sync_code"](kling_emulator)


SIGNED = "https://cdn.test/o/abc123?X-Amz-Signature=f00"


@pytest.mark.parametrize("url", [SIGNED, "https://x.test/a.ogg"])
async def test_url_extension_checked_when_asked(http: aiohttp.ClientSession, url: str) -> None:
    async with KlingEmulator(check_url_extension=True) as emu:
        status, body = await call(http, emu, "POST", CV, json={"voice_name": "v",
                                                               "voice_url": url})
        assert (status, body["code"]) == (400, 1201) and "voice_url" in body["message"]
        assert emu.task_count == 0


@pytest.mark.parametrize(("url", "outcome"), [
    (SIGNED, ""), ("https://cdn.test/clip-12s", ""), ("https://cdn.test/k/ab123s", ""),
    ("https://x.test/a.ogg", "format is not supported"),
    ("https://cdn.test/clip-3s", "between 5s and 30s"),
])
@pytest.mark.parametrize("options", [{}, {"check_url_extension": False}], ids=["default", "off"])
async def test_without_url_extension_check_the_media_is_judged(
        http: aiohttp.ClientSession, url: str, outcome: str, options: dict[str, Any]) -> None:
    async with KlingEmulator(**options) as emu:
        status, created = await call(http, emu, "POST", CV, json={"voice_name": "v",
                                                                  "voice_url": url})
        assert status == 200
        emu.advance(emu.task_seconds + 1)
        _, got = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
    data = got["data"]
    assert data["task_status"] == ("failed" if outcome else "succeed")
    assert outcome in data["task_status_msg"]


@pytest.mark.parametrize("url", ["ftp://x.test/a.wav", "https:///a.wav", "a.wav"])
async def test_voice_url_needs_http_and_a_host(http: aiohttp.ClientSession, url: str) -> None:
    async with KlingEmulator(check_url_extension=False) as emu:
        status, body = await call(http, emu, "POST", CV, json={"voice_name": "v",
                                                               "voice_url": url})
    assert (status, body["code"]) == (400, 1201) and "http(s)" in body["message"]


async def test_sample_cache_is_bounded(emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    from voiceapi.testing._emulator import _cached_wav

    for i in range(20):
        async with http.get(f"{emu.base_url}/samples/n{i}-{5 + i / 10:g}s.wav") as resp:
            assert resp.status == 200
    assert _cached_wav.cache_info().currsize <= 16


async def test_every_reading_serves_a_consistent_listing(
        reading_emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    emu = reading_emu
    emu.concurrency = 50
    for i in range(5):
        assert (await _create(http, emu, f"v{i}", f"ext-{i}"))[0] == 200
    emu.advance(emu.task_seconds + 1)
    seen: list[dict[str, Any]] = []
    for page in range(1, 10):  # bounded walk; ends on a short page
        _, body = await call(http, emu, "GET", CV, params={"pageNum": str(page),
                                                           "pageSize": "2"})
        seen += body["data"]
        if len(body["data"]) < 2:
            break
    assert sorted(t["task_id"] for t in seen) == sorted(t["task_id"] for t in emu.tasks())
    for task in seen:
        assert task["task_status"] == "succeed"
        assert float(task["final_unit_deduction"]) == 0.05
        assert int(task["updated_at"]) >= int(task["created_at"])
        (voice,) = task["task_result"]["voices"]
        assert voice.get("status", "succeed") == "succeed"


def test_main_on_a_busy_port_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run_emulator_main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}:") and err.count("\n") == 1


async def test_a_failed_start_leaves_nothing_running() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        emu = KlingEmulator(port=busy.getsockname()[1])
        with pytest.raises(OSError):
            await emu.start()
    assert emu._runner is None and emu._ticker is None
    with pytest.raises(RuntimeError, match="not running"):
        emu.base_url  # noqa: B018


async def test_stop_does_not_wait_for_a_slow_answer(http: aiohttp.ClientSession) -> None:
    emu = KlingEmulator()
    await emu.start()
    emu.inject("presets", "slow", delay=600)
    pending = asyncio.ensure_future(call(http, emu, "GET", "/v1/general/presets-voices"))
    for _ in range(500):  # bounded: until the request is being answered
        if emu.count("presets"):
            break
        await asyncio.sleep(0.01)
    assert emu.count("presets") == 1
    await asyncio.wait_for(emu.stop(), 20)  # a 600 s answer is dropped, not awaited
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(pending, 20)


async def test_bugs_in_the_emulators_own_routes_are_recorded(
        emu: KlingEmulator, http: aiohttp.ClientSession) -> None:
    _break(emu, "stats", RuntimeError("stats bug"))
    async with http.get(emu.base_url + "/_emulator/stats") as resp:
        assert resp.status == 500
    (error,) = emu.internal_errors
    assert error.startswith("GET /_emulator/stats (emulator route):") and "stats bug" in error
    emu.internal_errors.clear()


@pytest.mark.parametrize(("reading", "shape"), [
    ("empty", {"voices": []}), ("null", {"voices": None}), ("absent", None)])
async def test_pending_voices_shapes(http: aiohttp.ClientSession, reading: str,
                                     shape: dict[str, Any] | None) -> None:
    async with KlingEmulator(pending_voices=reading) as emu:
        _, created = await _create(http, emu, "v")
        _, bad = await call(http, emu, "POST", CV, json={
            "voice_name": "bad", "voice_url": emu.sample_url(3)})
        _, pending = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
        emu.advance(emu.task_seconds + 1)
        _, failed = await call(http, emu, "GET", f"{CV}/{bad['data']['task_id']}")
        _, done = await call(http, emu, "GET", f"{CV}/{created['data']['task_id']}")
    for unfinished in (pending["data"], failed["data"]):
        assert unfinished.get("task_result") == shape
    assert failed["data"]["task_status"] == "failed"
    assert len(done["data"]["task_result"]["voices"]) == 1  # a voice once it succeeded


@pytest.mark.slow
def test_our_suite_fails_a_test_whose_emulator_hit_a_bug_once(tmp_path: Path) -> None:
    """tests/conftest.py checks the ``emu`` fixture and every emulator a test starts itself,
    reporting each bug once."""
    (tmp_path / "test_ours.py").write_text(textwrap.dedent('''
        from voiceapi.testing import KlingEmulator

        def bug(emu, text):
            try:
                raise RuntimeError(text)
            except RuntimeError:
                emu._record_internal_error("forced")

        async def test_fixture(emu):
            bug(emu, "fixture bug")

        async def test_own_emulator():
            async with KlingEmulator() as mine:
                bug(mine, "own bug")

        async def test_clean(emu):
            async with KlingEmulator():
                pass
    '''))
    root = Path(__file__).resolve().parents[1]
    # -n 0: our pyproject runs xdist workers, and each would report the bug once. Without CI
    # and BUILD_NUMBER: under CI pytest repeats each error's message in its short summary.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "BUILD_NUMBER")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "-c", str(root / "pyproject.toml"), "-p", "tests.conftest", "-n", "0",
                          str(tmp_path)], capture_output=True, text=True, timeout=120,
                         cwd=root, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "3 passed, 2 errors" in out.stdout
    assert out.stdout.count("RuntimeError: fixture bug") == 1
    assert out.stdout.count("RuntimeError: own bug") == 1
    assert "ExceptionGroup" not in out.stdout


def test_every_reading_option_has_a_command_line_flag() -> None:
    from voiceapi.testing import build_parser
    from voiceapi.testing._options import READING_DEFAULTS

    text = build_parser().format_help()
    for name in [*READING_DEFAULTS, "profile"]:
        assert "--" + name.replace("_", "-") in text
    assert "/_emulator/stats" in text


def test_the_with_mode_ends_handlers_of_clients_that_went_away(
        caplog: pytest.LogCaptureFixture) -> None:
    """A `slow` answer whose client gave up: aiohttp stops tracking the handler when the
    connection is lost, so the emulator's own thread must end it before closing its loop (it
    was destroyed pending, logged as "Task was destroyed but it is pending!")."""
    with KlingEmulator() as emu:
        emu.inject("presets", "slow", delay=60, times=1)
        request = urllib.request.Request(emu.base_url + "/v1/general/presets-voices",
                                         headers={"Authorization": f"Bearer {emu.api_key}"})
        with pytest.raises(OSError):  # the client gives up; the handler sleeps on
            urllib.request.urlopen(request, timeout=0.5)
        for _ in range(1000):  # bounded: until the server has the request
            if emu.count("presets"):
                break
            time.sleep(0.01)
        assert emu.count("presets") == 1
    gc.collect()
    assert [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()] == []
