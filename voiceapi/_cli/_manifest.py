"""Batch manifests in (CSV, JSON lines, a JSON array) and results files out (CSV, JSON lines).

Every problem is a ``InputError`` (exit 2, one clear line) that names the file and the
line, never a traceback: manifests are hand-made, and "line 7 has no voice_name" is the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from .. import _constants as C
from .._batch import prepare
from .._models import BatchResult
from ._output import InputError, masked, result_status

MANIFEST_MAX_BYTES = C.CLI_MANIFEST_MAX_BYTES  # a module name tests can lower

FIELDS = ("voice_name", "voice_url", "video_id", "external_task_id", "callback_url")
REPORT_SUFFIXES = (".csv", ".jsonl")
REPORT_FIELDS = ("row", *FIELDS, "status", "task_id", "voice_id", "error")


@attrs.frozen
class Row:
    where: str  # "line 7" (CSV, JSON lines) or "item 3" (a JSON array)
    data: dict[str, Any]
    problem: str | None = None


def _decode(path: Path, data: bytes, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except LookupError:
        raise InputError(f"unknown --encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode text"
            raise InputError(f"{path} is UTF-16 (it starts with its byte-order mark): give "
                             "--encoding utf-16, or save it as CSV UTF-8") from None
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}: line {line} is not valid {encoding} (byte 0x{data[exc.start]:02x}); "
            "save the file as UTF-8, or name its encoding, e.g. --encoding cp1252") from None
    return text.removeprefix("\ufeff")  # a BOM, whatever encoding was named


def _kind(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    start = text.lstrip()[:1]
    return {"[": "json", "{": "jsonl"}.get(start, "csv")


def read_manifest(path: Path, encoding: str = "utf-8-sig") -> list[Row]:
    """The rows of a manifest, each with where it came from; a row that cannot be read carries
    its problem. Raises ``InputError`` when the file as a whole is unusable."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MANIFEST_MAX_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MANIFEST_MAX_BYTES:
        raise InputError(f"{path} is larger than {MANIFEST_MAX_BYTES >> 20} MiB: split it into "
                         "several manifests (one batch each; they can share --journal)")
    text = _decode(path, data, encoding)
    kind = _kind(path, text)
    rows = {"json": _json_rows, "jsonl": _jsonl_rows, "csv": _csv_rows}[kind](path, text)
    if not rows:
        what = "only a header" if kind == "csv" and text.strip() else "no rows"
        raise InputError(f"{path} has {what}: nothing to create")
    return rows


def _object_row(where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        return Row(where, {}, f"expected an object with voice_name, got {type(value).__name__}")
    for key, field in value.items():
        # JSON may spell a lone surrogate ("\\udcff"): no text encoding can carry it, and the
        # batch's id hashing would fail on it before the row's own validation names it.
        if isinstance(field, str) and not _is_text(field):
            return Row(where, {}, f"{key} holds a lone surrogate (\\ud800-\\udfff): not text")
    unknown = sorted(str(k) for k in value if k not in FIELDS)
    if unknown:
        return Row(where, value, f"unknown key(s) {_some(unknown)} "
                                 f"(known: {', '.join(FIELDS)})")
    return Row(where, value)


def _some(names: Sequence[str], most: int = 5, longest: int = 40) -> str:
    """Names for a message, quoted and escaped (a manifest from elsewhere may carry terminal
    escapes: ``"\\u001b]0;…"`` as a JSON key retitled the terminal), at most ``most`` of them
    and each cut to ``longest`` characters (a header may have thousands: 700 kB of message)."""
    shown = [repr(n if len(n) <= longest else n[:longest] + "…") for n in names[:most]]
    more = len(names) - most
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_rows(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        hint = ("; one object per line is JSON lines: name the file .jsonl"
                if str(exc).startswith("Extra data") else "")
        raise InputError(f"{path}: not valid JSON ({exc}){hint}") from None
    except RecursionError:
        raise InputError(f"{path}: not a manifest (JSON nested too deeply)") from None
    if not isinstance(value, list):
        raise InputError(f"{path}: a .json manifest must be an array of objects "
                               "(or use JSON lines: one object per line, .jsonl)")
    return [_object_row(f"item {i}", v) for i, v in enumerate(value, start=1)]


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            rows.append(Row(f"line {n}", {}, "not valid JSON"))
            continue
        except RecursionError:
            rows.append(Row(f"line {n}", {}, "JSON nested too deeply"))
            continue
        rows.append(_object_row(f"line {n}", value))
    return rows


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [(h or "").strip() for h in (reader.fieldnames or ())]
    except csv.Error as exc:
        raise InputError(f"{path}: not a CSV file ({exc})") from None
    if not header:
        raise InputError(f"{path} is empty: expected a CSV header with voice_name")
    reader.fieldnames = header
    unknown = [h for h in header if h not in FIELDS]
    separator = next((c for c in ";\t|" if len(header) == 1 and c in header[0]), None)
    if separator is not None:  # a spreadsheet's export in a locale whose lists use ";"
        raise InputError(f"{path}: the header is one column holding {separator!r}: a CSV "
                         "manifest is separated by commas (or use JSON lines, .jsonl)")
    if unknown:  # said once, for the header, not once per row
        raise InputError(f"{path}: unknown column(s) {_some(unknown)} in the header "
                         f"(known: {', '.join(FIELDS)})")
    if "voice_name" not in header:
        raise InputError(f"{path}: the CSV header needs a voice_name column")
    rows = []
    try:
        for raw in reader:
            where = f"line {reader.line_num}"
            if None in raw:
                rows.append(Row(where, {}, "more values than header columns"))
                continue
            rows.append(Row(where, {k: v.strip() for k, v in raw.items()
                                    if isinstance(v, str) and v.strip()}))
    except csv.Error as exc:
        # line_num counts the lines read whole; the error is on the one being read
        raise InputError(f"{path}: line {reader.line_num + 1}: {exc}") from None
    return rows


def validate(rows: Sequence[Row]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(items, where each item came from, problems): problems name the row."""
    problems = [f"{r.where}: {r.problem}" for r in rows if r.problem is not None]
    good = [r for r in rows if r.problem is None]
    for r in good:
        if not r.data.get("voice_name"):
            problems.append(f"{r.where}: voice_name is missing")
    good = [r for r in good if r.data.get("voice_name")]
    for r, entry in zip(good, prepare([r.data for r in good]), strict=True):
        if entry.error is not None:
            problems.append(f"{r.where}: {entry.error}")
    return [r.data for r in good], [r.where for r in good], problems


def check_report_path(path: Path) -> None:
    """Refuse a results file we could not write, before anything is sent."""
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--report {path}: use a .csv or .jsonl file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"--report {path}: the folder {parent} does not exist")
    if path.is_dir() or not os.access(parent, os.W_OK) or \
            (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--report {path}: cannot write it there")


def report_rows(results: Sequence[BatchResult], wheres: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for r, where in zip(results, wheres, strict=True):
        t = r.task
        row = {"row": where, **{f: str(r.input.get(f, "") or "") for f in FIELDS}}
        if t is not None and t.external_task_id:
            row["external_task_id"] = t.external_task_id
        row.update(status=result_status(r), task_id=t.task_id if t else "",
                   voice_id=(t.voice_id or "") if t else "",
                   error=str(r.error) if r.error else "")
        rows.append(row)
    return rows


#: A spreadsheet runs a cell that starts with one of these as a formula ("CSV injection"): the
#: error column carries the server's text, and names are whatever the manifest held.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: str) -> str:
    """A CSV report cell that a spreadsheet shows as text: a leading ``'`` before a formula
    start (OWASP's advice); every other value as it is."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def write_report(path: Path, results: Sequence[BatchResult], wheres: Sequence[str]) -> None:
    """Every input row with its task id, voice id, status and error; written whole or not at
    all (a temporary file renamed into place), so a reader never sees half a report."""
    rows = report_rows(results, wheres)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
            writer.writeheader()
            writer.writerows({k: _inert(masked(v)) for k, v in row.items()} for row in rows)
        else:
            fh.writelines(masked(json.dumps(row, ensure_ascii=False)) + "\n" for row in rows)
    os.replace(tmp, path)
