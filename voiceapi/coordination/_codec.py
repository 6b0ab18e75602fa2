"""Task observations and journal entries as JSON, for other workers to read back.

Written by this package and read by this package only, but Redis is shared: a value that does
not parse (another version, a stray write) is treated as "no observation", never a crash.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .._coordinator import JournalEntry
from .._models import BalanceDeduction, TaskStatus, Voice, VoiceTask


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def dump_task(task: VoiceTask) -> str:
    deduction = task.final_balance_deduction
    return json.dumps({
        "task_id": task.task_id, "task_status": task.task_status.value,
        "task_status_msg": task.task_status_msg, "external_task_id": task.external_task_id,
        "voices": [{"voice_id": v.voice_id, "voice_name": v.voice_name,
                    "trial_url": v.trial_url, "owned_by": v.owned_by, "status": v.status}
                   for v in task.voices],
        "created_at": _time(task.created_at), "updated_at": _time(task.updated_at),
        "final_unit_deduction": task.final_unit_deduction,
        "final_balance_deduction": None if deduction is None else
        {"quota": deduction.quota, "list_price": deduction.list_price},
    }, separators=(",", ":"))


def load_task(raw: str | bytes | None) -> VoiceTask | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        deduction = d.get("final_balance_deduction")
        return VoiceTask(
            task_id=str(d["task_id"]), task_status=TaskStatus(d["task_status"]),
            task_status_msg=str(d.get("task_status_msg") or ""),
            external_task_id=d.get("external_task_id"),
            voices=[Voice(voice_id=str(v["voice_id"]), voice_name=str(v.get("voice_name", "")),
                          trial_url=str(v.get("trial_url", "")),
                          owned_by=str(v.get("owned_by", "")), status=v.get("status"))
                    for v in d.get("voices") or []],
            created_at=_parse_time(d.get("created_at")),
            updated_at=_parse_time(d.get("updated_at")),
            final_unit_deduction=d.get("final_unit_deduction"),
            final_balance_deduction=None if not isinstance(deduction, dict) else
            BalanceDeduction(quota=str(deduction.get("quota", "")),
                             list_price=str(deduction.get("list_price", ""))))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def dump_entry(task_id: str, status: str) -> str:
    return json.dumps({"task_id": task_id, "status": status}, separators=(",", ":"))


def load_entry(raw: str | bytes | None) -> JournalEntry | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if isinstance(d, dict) and isinstance(d.get("task_id"), str):
            return JournalEntry(task_id=d["task_id"], status=str(d.get("status")))
    except ValueError:
        pass
    return None
