"""JSON-lines files (ledger, registry, reports): one JSON object per line."""

from __future__ import annotations

import json


def parse_json_lines(text: str, source: str) -> list[dict]:
    """The objects of a JSON-lines text; a bad line raises ValueError naming `source:line`."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{source}:{number}: not a JSON object")
        records.append(record)
    return records
