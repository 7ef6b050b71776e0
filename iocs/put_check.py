"""Checking a put on the value the client sent, before caproto converts it.

caproto converts a put to the PV's type before any putter runs: 65537 becomes 1 on a 16-bit PV,
NaN or 0.5 become 0 on an integer, '' becomes 0.0, an enum index -1 picks the last string. So the
check below reads the request as it came off the wire (`sent`) and decides against the PV's
declaration (type, length, control limits, enum strings, text length) whether to accept it. It
returns the typed value for messages and the reason for a refusal (None: accepted).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from caproto import ChannelType, native_type

# C0 and C1 control characters and DEL: a name or path with them rewrites an operator's terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_INT_RANGE = {ChannelType.INT: (-(2 ** 15), 2 ** 15 - 1), ChannelType.LONG: (-(2 ** 31), 2 ** 31 - 1),
              ChannelType.CHAR: (0, 255)}
_FLOAT_MAX = {ChannelType.FLOAT: float(np.finfo(np.float32).max),
              ChannelType.DOUBLE: float(np.finfo(np.float64).max)}
_TEXT_TYPES = (ChannelType.STRING,)
MAX_SHOWN = 40          # characters of a typed value quoted in a message
MAX_STRING_BYTES = 39   # a DBR_STRING holds 40 bytes with its terminating NUL


@dataclass(frozen=True)
class Sent:
    """A put as the client sent it: text (DBR_STRING) or numbers, any count."""
    texts: tuple[bytes, ...] | None
    numbers: np.ndarray | None

    @classmethod
    def from_wire(cls, data, data_type) -> "Sent":
        if native_type(data_type) in _TEXT_TYPES:
            items = [data] if isinstance(data, (bytes, str)) else list(data)
            return cls(tuple(i if isinstance(i, bytes) else str(i).encode() for i in items), None)
        return cls(None, np.atleast_1d(np.asarray(data)))

    def text(self) -> str:
        """A text put (checked already) as a str: up to its first NUL, UTF-8."""
        raw = self.texts[0] if self.texts is not None else bytes(self.numbers.astype(np.uint8))
        return raw.split(b"\0")[0].decode("utf-8")

    @property
    def count(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.numbers.size)

    def shown(self) -> str:
        """The typed value for a message, quoted as typed (strings in quotes, numbers as numbers)."""
        if self.texts is not None:
            items = [repr(t.rstrip(b"\0").decode("utf-8", "backslashreplace")) for t in self.texts]
        else:
            items = [_number(v) for v in self.numbers[:8]]
        text = items[0] if self.count == 1 else f"[{', '.join(items)}{', ...' if self.count > 8 else ''}] " \
                                                f"({self.count} values)"
        return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _number(v) -> str:
    v = v.item() if hasattr(v, "item") else v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def check(pv, sent: Sent) -> str | None:
    """Why `pv` must refuse `sent`, or None. `pv` is a caproto ChannelData (the PV's declaration)."""
    kind = pv.data_type
    if kind == ChannelType.ENUM:
        return _check_enum(pv, sent)
    if kind == ChannelType.CHAR:
        return _check_text(pv, sent, long=True)
    if kind == ChannelType.STRING:
        return _check_text(pv, sent, long=False)
    return _check_numbers(pv, sent)


def _check_enum(pv, sent: Sent) -> str | None:
    strings = list(pv.enum_strings)
    choices = ", ".join(f"{i} ({s})" for i, s in enumerate(strings))
    if sent.count != 1:
        return f"takes one value, got {sent.count}; use one of {choices}"
    if sent.texts is not None:
        text = _decode(sent.texts[0])
        if text in strings:
            return None
        return f"is not one of its states; use one of {choices}"
    value = float(sent.numbers[0])
    if not math.isfinite(value) or not value.is_integer() or not 0 <= value < len(strings):
        return f"is not a state index; use one of {choices}"
    return None


def _check_text(pv, sent: Sent, *, long: bool) -> str | None:
    if sent.count != 1 and sent.texts is not None:
        return f"takes one string, got {sent.count}"
    if sent.texts is not None:
        raw = sent.texts[0].rstrip(b"\0")
    elif not long:
        return "takes text, not numbers"
    elif sent.numbers.dtype.kind not in "ui" or sent.numbers.size and not (
            0 <= sent.numbers.min() and sent.numbers.max() <= 255):
        return "takes text (bytes 0..255), not numbers"
    else:       # a CHAR waveform: the text ends at the first NUL
        raw = bytes(sent.numbers.astype(np.uint8)).split(b"\0")[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    if _CONTROL.search(text):
        return "contains control characters; use printable text"
    limit = getattr(pv, "max_chars", None) or (pv.max_length - 1 if long else MAX_STRING_BYTES)
    if len(text) > limit or len(raw) > (pv.max_length - 1 if long else MAX_STRING_BYTES):
        return f"is longer than {limit} characters"
    return None


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _check_numbers(pv, sent: Sent) -> str | None:
    if sent.texts is not None:
        values = []
        for raw in sent.texts:
            text = _decode(raw).strip()
            try:
                values.append(float(text))
            except ValueError:
                return "is not a number" if text else "is empty, not a number"
        numbers = np.asarray(values)
    else:
        numbers = sent.numbers.astype(float)
    n, max_length = numbers.size, max(1, int(pv.max_length or 1))
    if max_length == 1 and n != 1:
        return f"takes one value, got {n}"
    if max_length > 1:
        want = getattr(pv, "put_length", "exact")
        if want == "exact" and n != max_length:
            return f"takes exactly {max_length} values, got {n}"
        if not 1 <= n <= max_length:
            return f"takes 1..{max_length} values, got {n}"
    if not np.all(np.isfinite(numbers)):
        return "must be a finite number"
    integral = pv.data_type in _INT_RANGE
    if integral and not np.all(numbers == np.round(numbers)):
        return "must be a whole number"
    lo, hi = pv.lower_ctrl_limit, pv.upper_ctrl_limit
    if lo == hi:      # no declared range: the type's own, so nothing wraps around
        lo, hi = _INT_RANGE.get(pv.data_type) or (-_FLOAT_MAX[pv.data_type], _FLOAT_MAX[pv.data_type])
    bad = numbers[(numbers < lo) | (numbers > hi)]
    if bad.size:
        units = f" {pv.units}" if getattr(pv, "units", "") else ""
        which = "" if n == 1 else f" ({bad.size} of {n} values, e.g. {_number(bad[0])})"
        return f"is outside {_number(lo)}..{_number(hi)}{units}{which}"
    return None
