"""Every writable PV of every IOC against bad puts: wrong types, NaN, inf, huge, negative and
wrap-around numbers, wrong lengths, empty strings, control characters.

A put must either be refused (error status, value unchanged, the PV in WRITE alarm, Refusals_RBV
one up, StatusMessage_RBV naming the PV, the typed value and a reason) or accepted as sent (inside
the PV's published control limits, stored without wrapping). The test counts crashes (no answer,
an unexpected exception in the IOC), wrong state changes and refusals without a reason: all zero.

The IOCs are a fresh set of their own (own prefix, own CA port), so the session's lab keeps its
state; an accepted put is undone at once.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.threading.client import Context

from calbench.devices.ca_whole_sends import install as send_whole_messages
from calbench.iocs.base import InstrumentIOC
from calbench.iocs.build import build_iocs
from calbench.iocs.server import IocThread
from conftest import own_ca_port, own_prefix

D, L, S, C = ChannelType.DOUBLE, ChannelType.LONG, ChannelType.STRING, ChannelType.CHAR
NUMBERS = [(D, v) for v in (math.nan, math.inf, -math.inf, 1e308, -1e308, 0.5, -1.0, 65537.0,
                            -65535.0, 67536.0, 1e9)] + \
          [(L, v) for v in (65537, -65535, 67536, -1)] + \
          [(S, v) for v in ("", "abc", "nan", "1e400", "\x1b[2J")]
ENUM = [(D, v) for v in (-1.0, 0.5, math.nan, math.inf, 65537.0)] + \
       [(L, v) for v in (65537, -1, -65535)] + [(S, v) for v in ("Maybe", "", "\x1b[2J", " On")]
TEXT = [(S, v) for v in ("\x1b[2J", "a\nb", "\x7f", "x\x00y", "\u0085")] + \
       [(D, 1.5), (L, -1)]
CHAR_TEXT = [(C, np.frombuffer(b"\xff\xfe", np.uint8)), (C, np.frombuffer(b"tab\there", np.uint8))]
ALWAYS_INVALID_TEXT = ("\x1b", "\n", "\x7f", "\u0085", "\t")


@pytest.fixture(scope="module")
def fuzz_lab(lab_config, monkeypatch_module):
    own_ca_port(monkeypatch_module)
    cfg = own_prefix(lab_config, "F")
    groups = build_iocs(cfg, time_scales={"qc6": 100.0, "xray": 5.0, "bench": 50.0, "fee": 100.0})
    server = IocThread(groups).start()
    send_whole_messages()   # the 4 MB trimbit puts, as ophyd sends them in calbench
    ctx = Context()
    yield groups, ctx
    ctx.disconnect()
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _writable(groups):
    for ioc in groups:
        for name, pv in ioc.pvdb.items():
            if not type(pv).__name__.endswith("RO") and isinstance(ioc, InstrumentIOC):
                yield ioc, name


def _cases(native, count, max_length):
    if native == ChannelType.ENUM:
        return ENUM + [(L, [0, 0])]
    if native == ChannelType.STRING:
        return TEXT + [(S, "x" * 39), (S, ["a", "b"])]
    if native == ChannelType.CHAR:
        return TEXT + CHAR_TEXT + [(C, np.full(max_length + 5, 120, np.uint8))]
    if count > 1:       # a waveform: a wrong length, bad elements
        good = [0.0] * count
        return [(D, good[:-1]), (D, [math.nan] + good[1:]), (D, [1e308] + good[1:]),
                (D, [-1.0] * count)] + NUMBERS[:3]
    return NUMBERS + [(D, [1.0, 1.0])]


def _text(data) -> str:
    if len(data) and isinstance(data[0], bytes):
        return data[0].rstrip(b"\0").decode("utf-8", "replace")
    return bytes(np.asarray(data, np.uint8)).split(b"\0")[0].decode("utf-8", "replace")


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "SUO" or b.dtype.kind in "SUO":
        return a.shape == b.shape and bool(np.all(a == b))
    return bool(np.array_equal(a, b, equal_nan=True))


def _accepted_validly(native, md, count, data_type, sent, stored) -> bool:
    """An accepted put must be a valid value, stored as sent."""
    if native in (ChannelType.STRING, ChannelType.CHAR):
        if data_type not in (S, C) or isinstance(sent, list):
            return False
        # a DBR_STRING, like a CHAR waveform, ends at its first NUL
        text = sent.split("\0")[0] if isinstance(sent, str) else _text(sent)
        if any(c in text for c in ALWAYS_INVALID_TEXT):
            return False
        return _text(stored) == text
    if native == ChannelType.ENUM:
        return data_type == S and sent in [s.decode() for s in md.enum_strings]
    if data_type == S:
        try:
            values = np.atleast_1d(float(sent))
        except ValueError:
            return False
    else:
        values = np.atleast_1d(np.asarray(sent, float))
    if values.size != count and not (count > 1 and 1 <= values.size <= count):
        return False
    lo, hi = md.lower_ctrl_limit, md.upper_ctrl_limit
    if not np.all(np.isfinite(values)) or lo == hi or np.any(values < lo) or np.any(values > hi):
        return False
    if native in (ChannelType.LONG, ChannelType.INT) and np.any(values != np.round(values)):
        return False
    stored = np.atleast_1d(np.asarray(stored, float))[:values.size]
    return bool(np.all(stored == values))


def test_every_writable_pv_refuses_bad_puts_with_a_reason(fuzz_lab):
    groups, ctx = fuzz_lab
    errors = _Errors()
    for name in ("calbench", "caproto"):
        logging.getLogger(name).addHandler(errors)
    names = [(ioc, name) for ioc, name in _writable(groups)]
    pvs = ctx.get_pvs(*[n for _, n in names], timeout=30)
    iocs = {ioc.prefix: ctx.get_pvs(ioc.prefix + "Refusals_RBV", ioc.prefix + "StatusMessage_RBV",
                                    timeout=30) for ioc in groups}
    counts = dict(puts=0, refused=0, accepted=0, crashes=0, wrong_state=0, no_reason=0)
    problems = []
    try:
        for (ioc, pvname), pv in zip(names, pvs):
            md = pv.read(data_type="control", timeout=10).metadata
            native, count = pv.channel.native_data_type, pv.channel.native_data_count
            max_length = count
            refusals, message = iocs[ioc.prefix]
            for data_type, sent in _cases(native, count, max_length):
                counts["puts"] += 1
                label = f"{pvname} <- {data_type.name} {sent if np.size(sent) < 8 else '[...]'!r}"
                try:
                    before = pv.read(timeout=10).data
                    n_refused = refusals.read(timeout=10).data[0]
                    data = sent if isinstance(sent, (list, np.ndarray)) else [sent]
                    reply = pv.write(data, data_type=data_type, wait=True, timeout=20)
                    after = pv.read(data_type="time", timeout=10)
                except Exception as exc:       # no answer, or the client could not send it
                    counts["crashes"] += 1
                    problems.append(f"crash: {label}: {exc!r}")
                    continue
                if reply.status.name == "ECA_PUTFAIL":
                    counts["refused"] += 1
                    text = _text(message.read(timeout=10).data)
                    reason = text.split(pvname, 1)[-1] if pvname in text else ""
                    if refusals.read(timeout=10).data[0] != n_refused + 1 or len(reason) < 8:
                        counts["no_reason"] += 1
                        problems.append(f"no reason: {label}: {text!r}")
                    if not _same(after.data, before) or after.metadata.severity != \
                            AlarmSeverity.MAJOR_ALARM or after.metadata.status != AlarmStatus.WRITE:
                        counts["wrong_state"] += 1
                        problems.append(f"refused but changed or not in alarm: {label}: "
                                        f"{before!r} -> {after.data!r} {after.metadata.status!r}")
                else:
                    counts["accepted"] += 1
                    if not _accepted_validly(native, md, count, data_type, sent, after.data):
                        counts["wrong_state"] += 1
                        problems.append(f"accepted: {label} -> {after.data!r}")
                    pv.write(before, wait=True, timeout=20)         # undo a valid change
        counts["crashes"] += len(errors.records)
        problems += [f"logged: {r.getMessage()}" for r in errors.records]
    finally:
        for name in ("calbench", "caproto"):
            logging.getLogger(name).removeHandler(errors)
    print(f"\nput fuzz over {len(names)} writable PVs of {len(groups)} IOCs: " +
          ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert not problems, "\n".join(problems[:40])
    assert counts["crashes"] == counts["wrong_state"] == counts["no_reason"] == 0
