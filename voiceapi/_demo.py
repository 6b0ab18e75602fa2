"""``voiceapi demo``: a realistic session through the public SDK, against the embedded emulator
when no credentials are given (nothing leaves the machine), or against a real server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import _constants as C
from ._batch import BatchProgress
from ._cli._output import shown, task_table
from ._client import AsyncVoiceClient
from ._models import BatchResult, VoiceTask


def _line(title: str) -> str:
    return f"\n== {title} " + "=" * max(0, 60 - len(title))


async def run_demo(make_client: Callable[[], AsyncVoiceClient] | None, *, task_seconds: float,
                   sample_urls: list[str], echo: Callable[..., None], as_json: bool,
                   client_options: dict[str, Any] | None = None) -> int:
    """Returns the exit code: 0 when every step behaved as expected. ``client_options`` are
    extra ``AsyncVoiceClient`` arguments for the embedded emulator's client (timeouts)."""
    say: Callable[..., None] = (lambda *a, **k: None) if as_json else echo
    if make_client is not None:
        async with make_client() as client:
            say(f"Using the Kling API at {client.base_url}")
            return await _scenario(client, sample_urls, None, say, echo, as_json,
                                   expected_failures=0)
    from .testing import KlingEmulator

    async with KlingEmulator(concurrency=3, task_seconds=task_seconds) as emu:
        say(f"No credentials given: using the embedded Kling emulator at {emu.base_url}")
        say("(set KLING_ACCESS_KEY/KLING_SECRET_KEY or KLING_API_KEY to use your account)")
        samples = [emu.sample_url(s) for s in (8, 12, 15, 20, 25)]
        samples.insert(3, emu.sample_url(3))  # too short: Kling rejects samples under 5 s
        bad_samples = 1
        async with AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url,
                                    **(client_options or {})) as client:
            return await _scenario(client, samples, emu.concurrency, say, echo, as_json,
                                   expected_failures=bad_samples)


async def _scenario(client: AsyncVoiceClient, samples: list[str], cap: int | None,
                    say: Callable[..., None], echo: Callable[..., None], as_json: bool, *,
                    expected_failures: int) -> int:
    """Returns the exit code: 0 when exactly ``expected_failures`` voices failed (the embedded
    emulator's deliberately bad sample; none on your own server, whatever your URLs say)."""
    summary: dict[str, Any] = {"base_url": client.base_url}
    say(_line("Preset voices (first page)"))
    presets = await client.preset_voices.list(page_size=5)
    for v in presets:
        say(f"  {shown(v.voice_id)}  {shown(v.voice_name)}")  # server text: escaped
    summary["presets_shown"] = len(presets)

    results: list[BatchResult] = []
    if samples:
        run = f"demo-{int(time.time())}"
        items = [{"voice_name": f"Demo voice {i + 1}", "voice_url": url,
                  "external_task_id": f"{run}-{i + 1}"} for i, url in enumerate(samples)]
        say(_line(f"Cloning {len(items)} voice{'s' if len(items) != 1 else ''} as one batch"))
        if cap:
            # "slots" below start at 2 and grow: the batch learns the cap from 1303 answers.
            say(f"  The emulated account allows {cap} tasks in progress. The batch is not told:"
                f" it starts with {C.BATCH_INITIAL_SLOTS} slots and learns the limit.")
        last = [""]

        def progress(p: BatchProgress) -> None:
            text = (f"  done {p.done}/{p.total}  ok {p.succeeded}  failed {p.failed}  "
                    f"running {p.submitted + p.processing}  slots {p.slots}")
            if text != last[0]:
                last[0] = text
                say(text)

        started = time.monotonic()
        results = await client.custom_voices.create_many(items, on_progress=progress)
        say(f"  finished in {time.monotonic() - started:.1f}s")
        for r in results:
            if r.ok and r.task is not None:
                say(f"  ok      {r.input['voice_name']}: voice_id "
                    f"{shown(r.task.voice_id or '')}")
            else:
                say(f"  failed  {r.input['voice_name']}: {r.error}")
        summary["created"] = sum(r.ok for r in results)
        summary["failed"] = sum(not r.ok for r in results)

        ok = [r for r in results if r.ok and r.task is not None]
        if ok and ok[0].task is not None:
            first = ok[0].task
            say(_line("Looking a task up by its external id"))
            found = await client.custom_voices.get(external_task_id=first.external_task_id)
            say(f"  {shown(found.external_task_id or '')} -> task {shown(found.task_id)}, "
                f"{found.task_status}")
            say(_line("Deleting one voice this demo created"))
            assert first.voice_id is not None
            await client.custom_voices.delete(first.voice_id)
            say(f"  deleted {shown(first.voice_id)}")
            summary["deleted"] = first.voice_id
    else:
        say("\n(no --sample-url given: skipping voice creation)")

    say(_line("Your custom voices (every page)"))
    count = 0
    first_tasks: list[VoiceTask] = []
    async for task in client.custom_voices.iter_all():
        count += 1
        if count <= 10:
            first_tasks.append(task)
    if first_tasks:
        say(task_table(first_tasks))
    say(f"  {count} task(s) in total")
    summary["tasks_listed"] = count
    if as_json:
        import json

        echo(json.dumps(summary))
    else:
        say(_line("Done"))
    return 0 if summary.get("failed", 0) == expected_failures else 1
