# Long by design: every slsdet call of the hardware backend, each against the fake with slsdet's interface.
"""The slsdet hardware backend against a fake object with slsdet's Eiger interface (slsdet itself,
and a detector, are not needed). The fake writes slsReceiver raw files and PSI trim files with
struct, independently of calbench's readers."""
from __future__ import annotations

import asyncio
import struct
import sys
import threading
import time
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

from calbench.contracts.trimfile import DAC_NAMES, write_trim_file
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.eiger import EigerHardware, open_eiger

NAMES = list(DAC_NAMES) + ["iodelay"]
VCMP = ["vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr"]


class detectorSettings(Enum):        # noqa: N801 - slsdet's spelling
    STANDARD = 0
    HIGHGAIN = 2
    UNDEFINED = 200


class runStatus(Enum):               # noqa: N801
    IDLE = 0
    RUNNING = 5
    STOPPED = 7


class dacIndex(Enum):                # noqa: N801 - slsdet's spelling (the members scanned here)
    VRPREAMP = 2
    VTHRESHOLD = 99
    TRIMBIT_SCAN = 150


class scanParameters:                # noqa: N801 - slsdet's scanParameters
    def __init__(self, dac=None, start=0, stop=0, step=0, settle=None):
        self.enable = int(dac is not None)
        self.dacInd = dac if dac is not None else dacIndex.VRPREAMP     # noqa: N815
        self.startOffset, self.stopOffset, self.stepSize = start, stop, step   # noqa: N815
        self.dacSettleTime_ns = int(settle.total_seconds() * 1e9) if settle else 0  # noqa: N815


class _Duration:                     # slsdet's DurationWrapper
    def __init__(self, ns):
        self.ns = ns

    def total_seconds(self):
        return self.ns * 1e-9


class _Dac:
    def __init__(self, det, name):
        self.det, self.name = det, name

    def __getitem__(self, key):
        values = [m["dacs"][self.name] for m in self.det.modules]
        return values[key]

    def __setitem__(self, key, value):
        self.det.check()
        idx = range(len(self.det.modules))[key] if isinstance(key, slice) else [key]
        values = value if isinstance(value, list) else [value] * len(idx)
        for i, v in zip(idx, values):
            self.det.modules[i]["dacs"][self.name] = int(v)


class _Dacs:
    def __init__(self, det):
        object.__setattr__(self, "_det", det)

    def __getattr__(self, name):
        if name not in NAMES:
            raise AttributeError(f"Dac not found: {name}")
        return _Dac(self._det, name)

    def __setattr__(self, name, value):
        getattr(self, name)[:] = value

    def get_asarray(self):
        return np.array([[m["dacs"][n] for m in self._det.modules] for n in NAMES], float)


class _Vcmp:
    def __init__(self, det):
        self.det = det

    def __getitem__(self, key):
        out = []
        for i, m in enumerate(self.det.modules):
            out += [m["dacs"][n] for n in (VCMP if i % 2 == 0 else VCMP[::-1])]
        return out[key]


class _Temp:
    def __init__(self):
        self.fpga = [41.5, 43.25]


RATE_CORRECTION_OFF = "Rate correction Deactivated, must be in 32 or 16 bit mode"


class FakeSlsEiger:
    """What the backend uses of slsdet.Eiger, for a 500k (two half modules), behaving as PSI's
    virtual EIGER server 9.2.0 and slsReceiver were seen to behave (tests/test_eiger_slsvirtual.py
    checks the backend against the real ones):

    - hostnames carry no serial; trim files are named after the module ids (031, 032);
    - a DAC put keeps the server's settings and threshold; trimval, loadTrimbits and tau != 0 make
      the settings undefined, the threshold energy stays;
    - a threshold energy or trim file sets tau only while rate correction is on; tau != 0 is
      refused outside 16/32 bit, and leaving 16/32 bit with tau on switches it off and throws;
    - the receiver writes one raw file per port; the header's column of a bottom half module's
      first port is the right one (beb firmware; the virtual server's colLeft/colRight);
    - acquire() would hold the GIL for the whole run: the backend must never call it.
    """

    def __init__(self, n_modules=2):
        defaults = dict(zip(NAMES, [0, 2480, 3300, 1400, 4000, 2556, 1000, 1000, 0, 1000, 1100,
                                    1100, 1000, 1000, 2000, 1550, 650]))
        self.modules = [{"dacs": dict(defaults), "trimbits": np.zeros((256, 1024), np.int32),
                         "tau": 0} for _ in range(n_modules)]
        self.hostname = ["localhost"] * n_modules
        self.module_ids = [31 + i for i in range(n_modules)]
        self.top = [i % 2 == 0 for i in range(n_modules)]
        self.dacs = _Dacs(self)
        self.temp = _Temp()
        self._dr, self.exptime, self.period, self._frames = 16, 1.0, 0.0, 1
        self._scan = scanParameters()
        self.settingspath, self.trimen, self.threshold = "/", [], -1
        self.settings = detectorSettings.UNDEFINED
        self.fpath = self.fname = ""
        self.findex, self.fwrite, self.rx_framesperfile = 0, False, 10000
        self.calls: list = []
        self.fail: Exception | None = None
        self.frame_s = 0.0                   # wall time per frame of a started acquisition
        self._run: threading.Thread | None = None
        self._stop = threading.Event()
        self.frames_sent = 0
        self.receiver = "IDLE"

    def check(self):
        if self.fail is not None:
            raise self.fail

    # the server's scan: frames are its steps; setting it (or none) puts frames back to 1
    @property
    def frames(self):
        if self._scan.enable:
            return abs(self._scan.stopOffset - self._scan.startOffset) // abs(
                self._scan.stepSize) + 1
        return self._frames

    @frames.setter
    def frames(self, n):
        if self._scan.enable and n != self.frames:
            raise RuntimeError(f"Could not set number of frames {n}. In scan mode, it is number "
                               f"of steps {self.frames}")
        self._frames = n

    def getScan(self):                               # noqa: N802 - slsdet's name
        return [self._scan] * len(self.modules)

    def setScan(self, params):                       # noqa: N802
        self.calls.append(("setScan", params.enable, params.startOffset, params.stopOffset,
                           params.stepSize))
        self._scan, self._frames = params, 1

    def size(self):
        return len(self.modules)

    def getModuleId(self):                           # noqa: N802 - slsdet's name
        return list(self.module_ids)

    def getTop(self):                                # noqa: N802
        return list(self.top)

    @property
    def vthreshold(self):
        per = [m["dacs"]["vcmp_ll"] if len({m["dacs"][n] for n in VCMP + ["vcp"]}) == 1 else -1
               for m in self.modules]
        return per[0] if len(set(per)) == 1 else per

    @vthreshold.setter
    def vthreshold(self, v):
        self.check()
        for m in self.modules:
            for n in VCMP + ["vcp"]:
                m["dacs"][n] = int(v)

    @property
    def vcmp(self):
        return _Vcmp(self)

    @vcmp.setter
    def vcmp(self, values):
        for i, m in enumerate(self.modules):
            for n, v in zip(VCMP if i % 2 == 0 else VCMP[::-1], values[4 * i:4 * i + 4]):
                m["dacs"][n] = int(v)

    @property
    def trimval(self):
        per = [int(m["trimbits"].flat[0]) if np.all(m["trimbits"] == m["trimbits"].flat[0])
               else -1 for m in self.modules]
        return per[0] if len(set(per)) == 1 else per

    @trimval.setter
    def trimval(self, v):
        for m in self.modules:
            m["trimbits"][:] = v
        self.settings = detectorSettings.UNDEFINED

    def _file(self, prefix, i):
        return Path(prefix if ".sn" in Path(prefix).name else f"{prefix}.sn{self.module_ids[i]:03d}")

    def _apply(self, m, ints):
        m["dacs"].update(zip(NAMES, ints[:17]))
        if m["tau"]:                                 # tau only while rate correction is on
            m["tau"] = ints[17]
        m["trimbits"] = np.array(ints[18:], np.int32).reshape(256, 1024)

    def loadTrimbits(self, prefix):                 # noqa: N802 - slsdet's name
        self.calls.append(("loadTrimbits", prefix))
        for i, m in enumerate(self.modules):
            raw = self._file(prefix, i).read_bytes()
            self._apply(m, struct.unpack(f"<{len(raw) // 4}i", raw))
        self.settings = detectorSettings.UNDEFINED

    def saveTrimbits(self, prefix):                 # noqa: N802
        for i, m in enumerate(self.modules):
            header = [m["dacs"][n] for n in NAMES] + [m["tau"]]
            self._file(prefix, i).write_bytes(
                struct.pack("<18i", *header) + m["trimbits"].astype("<i4").tobytes())

    def setThresholdEnergy(self, e, settings, trimbits):    # noqa: N802
        self.check()
        self.calls.append(("setThresholdEnergy", e, settings, trimbits))
        if e in self.trimen:
            name = settings.name.lower()
            for i, m in enumerate(self.modules):
                raw = Path(self.settingspath, name, f"{e}eV",
                           f"noise.sn{self.module_ids[i]:03d}").read_bytes()
                self._apply(m, struct.unpack(f"<{len(raw) // 4}i", raw))
        self.threshold, self.settings = e, settings

    @property
    def dr(self):
        return self._dr

    @dr.setter
    def dr(self, value):
        self._dr = value
        if value not in (16, 32) and any(m["tau"] for m in self.modules):
            for m in self.modules:
                m["tau"] = 0
            raise RuntimeError(f"Detector returned: {RATE_CORRECTION_OFF}")

    def getRateCorrection(self):                    # noqa: N802
        return [_Duration(m["tau"]) for m in self.modules]

    @property
    def ratecorr(self):
        return self.modules[0]["tau"] * 1e-9

    @ratecorr.setter
    def ratecorr(self, seconds):
        self.calls.append(("ratecorr", seconds))
        ns = int(round(seconds * 1e9))
        if ns and self._dr not in (16, 32):
            raise RuntimeError("Detector returned: Rate correction failed")
        for m in self.modules:
            m["tau"] = ns
        if ns:
            self.settings = detectorSettings.UNDEFINED

    def pulseChip(self, n):                          # noqa: N802
        self.calls.append(("pulseChip", n))

    def stop(self):
        self.calls.append(("stop",))
        self.stopDetector()

    # the image the fake detector "sees" in frame i; the receiver writes it per port
    def image(self, i):
        rows, cols = np.mgrid[0:512, 0:1024]
        return ((rows * 131 + cols * 7 + 1000 * i) % (2 ** min(self._dr, 16))).astype(np.uint32)

    def acquire(self):
        raise AssertionError("slsdet's acquire() holds the GIL for the whole acquisition; "
                             "the backend must start, poll and stop instead")

    def getReceiverStatus(self):                     # noqa: N802
        return [getattr(runStatus, self.receiver)] * len(self.modules)

    def startReceiver(self):                         # noqa: N802
        self.check()
        self.calls.append(("startReceiver",))
        self.receiver = "RUNNING"
        self._files = {port: bytearray() for port in range(2 * len(self.modules))}

    def stopReceiver(self):                          # noqa: N802
        self.calls.append(("stopReceiver",))
        if self.receiver == "RUNNING":
            for port, data in self._files.items():
                Path(self.fpath, f"{self.fname}_d{port}_f0_{self.findex}.raw").write_bytes(data)
        self.receiver = "IDLE"

    def startDetector(self):                         # noqa: N802
        self.check()
        self.calls.append(("startDetector", self.fpath, self.fname, self.findex))
        self._stop.clear()
        self.frames_sent = 0
        self._run = threading.Thread(target=self._send, daemon=True)
        self._run.start()

    def _send(self):
        for i in range(self.frames):
            if self._stop.wait(self.frame_s):
                return
            img = self.image(i)
            for hm in range(len(self.modules)):
                block = img[256:512] if hm == 0 else np.flipud(img[0:256])   # as read out
                halves = [block[:, :512], block[:, 512:]]
                for side in range(2):
                    # the firmware sends a bottom half module's right half on its first port
                    column = side if self.top[hm] else 1 - side
                    header = struct.pack("<QIIQQHHHHIHBB", i + 1, 0, 0, 0, 0, hm, 0, column, 0,
                                         0, 0, 3, 1) + bytes(64)
                    self._files[2 * hm + side] += header + _pack(halves[column].ravel(), self._dr)
            self.frames_sent = i + 1

    def getDetectorStatus(self):                     # noqa: N802
        running = self._run is not None and self._run.is_alive()
        state = runStatus.RUNNING if running else (
            runStatus.STOPPED if self._stop.is_set() else runStatus.IDLE)
        return [state] * len(self.modules)

    def stopDetector(self):                          # noqa: N802
        self.calls.append(("stopDetector",))
        self._stop.set()
        if self._run is not None:
            self._run.join()


def _pack(pixels, dr):
    if dr == 4:
        return ((pixels[0::2] & 0xF) | ((pixels[1::2] & 0xF) << 4)).astype(np.uint8).tobytes()
    if dr == 12:
        a, b = pixels[0::2].astype(np.uint32), pixels[1::2].astype(np.uint32)
        return np.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], axis=1) \
            .astype(np.uint8).tobytes()
    return pixels.astype({8: "u1", 16: "<u2", 32: "<u4"}[dr]).tobytes()


@pytest.fixture
def fake():
    return FakeSlsEiger()


@pytest.fixture
def hw(fake, tmp_path):
    return EigerHardware(fake, {"geometry": "500k", "scratch_dir": str(tmp_path / "scratch"),
                                "settings_dir": str(tmp_path / "settings"),
                                "trimen": [5400, 6400]}, settings_enum=detectorSettings,
                         scan_types=(scanParameters, dacIndex))


def test_dacs_map_to_slsdet_per_detector_and_per_half_module(hw, fake):
    hw.set_dac("vrpreamp", 3100)
    assert fake.dacs.vrpreamp[:] == [3100, 3100]
    hw.set_dac("vtrim", 2600, hm=1)
    assert fake.dacs.vtrim[:] == [2480, 2600]
    table = hw.dac_table()
    assert table.shape == (17, 2) and table[NAMES.index("vtrim")].tolist() == [2480, 2600]
    with pytest.raises(Refused, match="outside 0..4000"):
        hw.set_dac("vrpreamp", 4200)
    assert fake.dacs.vrpreamp[:] == [3100, 3100]
    table[NAMES.index("iodelay")] = [660, 661]
    hw.set_dac_table(table)
    assert fake.dacs.iodelay[:] == [660, 661]


def test_vthreshold_and_vcmp_follow_slsdets_chip_order(hw, fake):
    hw.set_vcmp([1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070])
    assert fake.modules[1]["dacs"]["vcmp_rr"] == 1040 and fake.modules[1]["dacs"]["vcmp_ll"] == 1070
    assert hw.vcmp() == [1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070]
    assert hw.vthreshold() == -1
    hw.set_vthreshold(1200)
    assert hw.vthreshold() == 1200 and hw.vcmp() == [1200] * 8


def test_trimbit_waveform_goes_through_trim_files_and_keeps_the_dacs(hw, fake):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 64, (512, 1024))
    hw.set_dac("vrpreamp", 3210)
    hw.set_trimbits(image)
    np.testing.assert_array_equal(fake.modules[0]["trimbits"], image[256:512])
    np.testing.assert_array_equal(fake.modules[1]["trimbits"], image[0:256])
    assert fake.dacs.vrpreamp[:] == [3210, 3210]
    np.testing.assert_array_equal(hw.trimbits(), image)
    assert hw.trimval() == -1
    hw.set_trimval(32)
    assert hw.trimval() == 32
    with pytest.raises(Refused, match="need 524288 values"):
        hw.set_trimbits(image[:10])


def test_load_refuses_a_missing_file_before_calling_slsdet(hw, fake, tmp_path):
    with pytest.raises(Refused, match="nope.sn031 not found"):
        hw.load_trimbits(str(tmp_path / "nope"))
    assert not any(c[0] == "loadTrimbits" for c in fake.calls)


def _settings(tmp_path):
    """standard/{5400,6400}eV/noise.sn031/032 with tau 300/250 ns and DACs 1000/1100."""
    for e, tau, dac in ((5400, 300, 1000), (6400, 250, 1100)):
        for sn in ("031", "032"):
            write_trim_file(tmp_path / "settings" / "standard" / f"{e}eV" / f"noise.sn{sn}",
                            np.full(16, dac), 660, tau, np.zeros((256, 1024)))


def test_threshold_energy_calls_set_threshold_energy_with_the_settings(hw, fake, tmp_path):
    _settings(tmp_path)
    assert fake.settingspath == str(tmp_path / "settings") and fake.trimen == [5400, 6400]
    hw.set_threshold_energy(6000)
    assert fake.calls[-1] == ("setThresholdEnergy", 6000, detectorSettings.STANDARD, True)
    assert hw.threshold_eV == 6000 and hw.loaded_settings == "standard"
    with pytest.raises(Refused, match="This energy 7000 not defined"):
        hw.set_threshold_energy(7000)
    hw.set_settings("highgain")
    with pytest.raises(Refused, match=r"highgain/5400eV/noise.sn031 not found"):
        hw.set_threshold_energy(5400)
    assert fake.calls[-1][1] == 6000                 # slsdet was not asked


@pytest.mark.parametrize("dr", [4, 8, 12, 16, 32])
def test_acquire_assembles_the_receivers_raw_files(hw, fake, dr):
    hw.set_dynamic_range(dr)
    hw.set_frames(3)
    hw.set_test_pulses(5)
    seen = []
    result = hw.acquire(lambda i, f, t: seen.append(i))
    assert result.frames.shape == (3, 512, 1024) and seen == [0, 1, 2]
    assert result.frames.dtype.itemsize == {4: 1, 8: 1, 12: 2, 16: 2, 32: 4}[dr]
    for i in range(3):
        np.testing.assert_array_equal(result.frames[i], fake.image(i))
    assert ("pulseChip", 5) in fake.calls
    assert not list(Path(fake.fpath).glob("*.raw")), "raw files are removed once read"


def test_garbage_from_the_receiver_is_a_fault(hw, fake):
    hw.set_dynamic_range(32)
    stop_receiver = fake.stopReceiver

    def short_files():
        stop_receiver()
        p = Path(fake.fpath, f"{fake.fname}_d1_f0_{fake.findex}.raw")
        p.write_bytes(p.read_bytes()[:-10])
    fake.stopReceiver = short_files
    with pytest.raises(InstrumentFault, match="not a whole number of .*-byte frames"):
        hw.acquire()


def test_slsdet_errors_become_refusals_or_faults(hw, fake):
    fake.fail = RuntimeError("Receiver returned: disk full")
    with pytest.raises(InstrumentFault, match="reachable"):
        hw.set_vthreshold(1200)
    fake.fail = RuntimeError("ClientSocket: Cannot connect to Detector:localhost on port 1952")
    with pytest.raises(InstrumentFault, match="switch the detector on"):
        hw.set_vthreshold(1200)
    fake.fail = RuntimeError("ClientSocket: Cannot connect to Receiver:localhost on port 1954")
    with pytest.raises(InstrumentFault, match="start slsReceiver there"):
        hw.acquire()
    fake.fail = RuntimeError("Dac value 5000 out of range")
    with pytest.raises(Refused, match="out of range"):
        hw.set_dac("vcal", 100)


def test_rate_correction_and_safe_state(hw, fake):
    hw.set_rate_correction(200)
    assert fake.calls[-1] == ("ratecorr", pytest.approx(200e-9)) and hw.tau_ns == 200
    hw.make_safe()
    assert ("stop",) in fake.calls and fake.calls[-1] == ("pulseChip", -1)


def test_geometry_mismatch_and_missing_slsdet_are_explained(fake, monkeypatch):
    with pytest.raises(InstrumentFault, match="2 half modules but .* a 1M"):
        EigerHardware(fake, {"geometry": "1M"})
    monkeypatch.setitem(sys.modules, "slsdet", None)
    with pytest.raises(InstrumentFault, match="slsdet .* is not installed"):
        open_eiger({})


def test_the_ioc_runs_over_the_hardware_backend_without_simulation_pvs(hw):
    from calbench.iocs.eiger import EigerIOC
    ioc = EigerIOC(prefix="HW:EIGER:", backend=hw)
    assert "HW:EIGER:vrpreamp" in ioc.pvdb and "HW:EIGER:DacTable_RBV" in ioc.pvdb
    assert not [name for name in ioc.pvdb if ":Sim:" in name]
    assert len(ioc.trimbits_rbv.value) == 512 * 1024


def test_serials_are_the_module_ids_whatever_the_hostnames(hw, fake, tmp_path):
    assert fake.hostname == ["localhost", "localhost"] and hw.serials == ["031", "032"]
    files = hw.save_trimbits(str(tmp_path / "saved" / "t"))
    assert [Path(f).name for f in files] == ["t.sn031", "t.sn032"]
    assert all(Path(f).is_file() for f in files)
    assert hw.load_trimbits(str(tmp_path / "saved" / "t")) == files
    with pytest.raises(Refused, match="without '.snNNN'"):
        hw.load_trimbits(files[0])                  # slsdet would load this one file everywhere
    fake.module_ids = [7, 1234]
    other = EigerHardware(fake, {"geometry": "500k", "scratch_dir": str(tmp_path / "s2")})
    assert other.serials == ["007", "1234"]


def test_half_modules_must_alternate_top_and_bottom(fake):
    fake.top = [False, True]
    with pytest.raises(InstrumentFault, match="half module 0 .* configured as bottom"):
        EigerHardware(fake, {"geometry": "500k"})


def test_tau_is_what_the_detector_applies(hw, fake, tmp_path):
    _settings(tmp_path)
    hw.set_threshold_energy(5400)
    assert hw.tau_ns == 0, "the file's tau applies only while rate correction is on"
    hw.set_rate_correction(200)
    assert hw.tau_ns == 200
    hw.set_threshold_energy(6400)
    assert hw.tau_ns == 250 == fake.modules[1]["tau"]
    hw.set_rate_correction(0)
    hw.load_trimbits(str(tmp_path / "settings" / "standard" / "5400eV" / "noise"))
    assert hw.tau_ns == 0


def test_rate_correction_and_dynamic_range_refuse_each_other(hw, fake):
    hw.set_rate_correction(200)
    hw.set_dynamic_range(32)                         # 16 <-> 32 keeps tau
    assert (fake.dr, hw.tau_ns) == (32, 200)
    with pytest.raises(Refused, match="rate correction is on .* RateCorrTau = 0 first"):
        hw.set_dynamic_range(8)
    assert (fake.dr, hw.tau_ns) == (32, 200), "refused before the detector was touched"
    hw.set_rate_correction(0)
    hw.set_dynamic_range(8)
    with pytest.raises(Refused, match="counts with 8; put DynamicRange = 16 or 32"):
        hw.set_rate_correction(100)
    assert hw.tau_ns == 0
    # the server's own words, should a request reach it anyway, are refusals, not faults
    with pytest.raises(Refused, match="Rate correction failed"):
        hw._call(lambda: setattr(fake, "ratecorr", 1e-7))
    fake.dr = 16
    fake.ratecorr = 1e-7
    with pytest.raises(Refused, match="must be in 32 or 16 bit"):
        hw._call(lambda: setattr(fake, "dr", 4))
    assert (hw.dr, hw.tau_ns) == (4, 0)


def test_threshold_reads_minus_one_after_direct_changes(hw, fake, tmp_path):
    _settings(tmp_path)
    for change in (lambda: hw.set_dac("vcal", 3000), lambda: hw.set_vthreshold(1200),
                   lambda: hw.set_vcmp([1100] * 8), lambda: hw.set_trimval(20),
                   lambda: hw.set_trimbits(np.full((512, 1024), 5)),
                   lambda: hw.set_rate_correction(150),
                   lambda: hw.load_trimbits(str(tmp_path / "settings/standard/6400eV/noise"))):
        hw.set_threshold_energy(5400)
        assert (hw.threshold_eV, hw.loaded_settings) == (5400, "standard")
        change()
        assert (hw.threshold_eV, hw.loaded_settings) == (-1, "undefined")
        assert fake.threshold == 5400, "the server keeps the old energy"
        hw.set_rate_correction(0)


def test_acquisition_aborts_and_never_uses_the_blocking_acquire(hw, fake):
    fake.frames, fake.frame_s = 40, 0.05
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=hw.acquire()))
    worker.start()
    deadline = time.monotonic() + 30
    while fake.frames_sent < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    hw.abort()
    worker.join(30)
    r = result["r"]
    assert r.aborted and 2 <= len(r.frames) < 40
    for i, frame in enumerate(r.frames):
        np.testing.assert_array_equal(frame, fake.image(i))
    names = [c[0] for c in fake.calls]
    assert names.index("startReceiver") < names.index("startDetector") < names.index(
        "stopDetector") < names.index("stopReceiver")


def test_a_detector_side_scan_goes_to_the_server_and_back(hw, fake):
    from calbench.contracts.eiger import parse_scan
    hw.set_scan(parse_scan("vthreshold 400 1600 300 5ms"))
    assert fake.calls[-1] == ("setScan", 1, 400, 1600, 300)
    assert hw.scan() == parse_scan("vthreshold 400 1600 300 5ms") and hw.frames == 5
    with pytest.raises(Refused, match="Scan = 0"):
        hw.set_frames(2)
    r = hw.acquire()
    assert len(r.frames) == 5 and not r.aborted
    np.testing.assert_array_equal(r.scan_values, [400, 700, 1000, 1300, 1600])
    assert np.allclose(np.diff(r.start_times), 1.0 + 0.005)      # exposure + settle per step
    hw.set_scan(parse_scan("trimbits 0 63 21"))
    assert fake._scan.dacInd == dacIndex.TRIMBIT_SCAN and hw.scan().target == "trimbits"
    hw.set_scan(None)
    assert hw.scan() is None and hw.frames == 1 and hw.acquire().scan_values is None


def test_ports_are_placed_by_the_column_in_their_headers(hw, fake):
    hw.set_frames(1)
    # the bottom half module's first port carries its right half (column 1)
    np.testing.assert_array_equal(hw.acquire().frames[0], fake.image(0))
    fake.top = [True, True]        # now it sends its left half first, and says so: still right
    np.testing.assert_array_equal(hw.acquire().frames[0], fake.image(0))
    send = fake._send

    def same_columns():
        send()
        for port, data in fake._files.items():      # every port claims column 0
            struct.pack_into("<H", data, 36, 0)
    fake._send = same_columns
    with pytest.raises(InstrumentFault, match="both ports of half module 0 carry column 0"):
        hw.acquire()


def test_the_ioc_serves_during_an_acquisition_and_aborts_it(hw, fake):
    from calbench.iocs.eiger import EigerIOC
    fake.frames, fake.frame_s = 40, 0.05
    ioc = EigerIOC(prefix="HW:EIGER:", backend=hw)

    async def main():
        acquiring = asyncio.ensure_future(ioc.acquire.write("Acquire"))
        while fake.frames_sent < 2:        # the event loop turns while the detector counts
            await asyncio.sleep(0.01)
        await ioc.acquire.write("Done")
        await asyncio.wait_for(acquiring, 30)

    asyncio.run(main())
    assert ioc.detector_state.value == "Aborted"
    assert 2 <= fake.frames_sent < 40 and ioc.images_counter.value == fake.frames_sent


def test_an_unexpected_backend_error_is_a_fault_and_the_ioc_serves_on(hw, fake):
    from calbench.iocs.eiger import EigerIOC
    ioc = EigerIOC(prefix="HW:EIGER:", backend=hw)

    async def main():
        fake.fail = KeyError("vcmp_xx")
        with pytest.raises(InstrumentFault):
            await ioc.vthreshold.write(1200)
        message = bytes(ioc.status_message.value).decode() if not isinstance(
            ioc.status_message.value, str) else ioc.status_message.value
        assert "KeyError" in message and ioc.connected.value == 0
        fake.fail = None
        dacs, fake.dacs = fake.dacs, None            # a readback that breaks in a new way
        with pytest.raises(InstrumentFault, match="AttributeError"):
            await ioc.refresh_settings()
        fake.dacs = dacs
        await ioc.vthreshold.write(1200)
        assert ioc.vthreshold_rbv.value == 1200

    asyncio.run(main())


def test_trimbits_never_set_read_back_as_minus_one(hw, fake):
    for m in fake.modules:           # a server just started: slsdet saves -1 for every pixel
        m["trimbits"][:] = -1
    assert np.all(hw.trimbits() == -1) and hw.trimval() == -1
    fake.modules[1]["trimbits"][0, 0] = 99
    with pytest.raises(InstrumentFault, match="cannot be read back"):
        hw.trimbits()
