"""Settings named in the words of the interface the user used.

The core names a setting once, neutrally: an option by its config key (`exports.csv_columns`),
a stage input by its name (`manifest`), optionally with a value. Which words that becomes is
chosen by the shell the user talks to, for the whole call: the stage commands speak flags
(`--csv-columns`, `--format csv`), everything else (a pipeline config, the DAGs, the Python
API) speaks config keys (`exports.csv_columns`, `exports.format: csv`). So a message reads
right wherever it surfaces (an exception, a rejection reason, a warning) without per-message
code in the shells, and without the core knowing which shell runs it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

Words = Callable[[str, Any], str]
UNSET: Any = object()


def _flow(value: Any) -> str:
    """A value as YAML flow text: `{a: b}`, `[x, y]`, `csv`."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _argument(value: Any) -> str:
    """A value as the command line takes it (`stage_cli`): `a=b,c=d`, `x y`, `csv`."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def config_words(name: str, value: Any = UNSET) -> str:
    """`exports.csv_columns`, `exports.format: csv`; an input stays its name (`manifest`)."""
    return name if value is UNSET else f"{name}: {_flow(value)}"


def flag_words(name: str, value: Any = UNSET) -> str:
    """`--csv-columns`, `--format csv`: the flag the stage command makes of the field."""
    flag = "--" + name.rsplit(".", 1)[-1].replace("_", "-")
    if value is UNSET:
        return flag
    if value is True or value is False:
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {_argument(value)}"


_WORDS: ContextVar[Words] = ContextVar("odapi_words", default=config_words)


def setting(name: str, value: Any = UNSET) -> str:
    """Setting `name` (a dotted config key, or a stage input's name), with `value` if given,
    in the words of the interface running this call."""
    return _WORDS.get()(name, value)


@contextmanager
def speaking(words: Words) -> Iterator[None]:
    """Within this block, `setting` speaks `words` (e.g. `flag_words` in a stage command)."""
    token = _WORDS.set(words)
    try:
        yield
    finally:
        _WORDS.reset(token)
