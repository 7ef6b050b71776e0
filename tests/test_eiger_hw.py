"""The slsdet hardware backend against a fake object with slsdet's Eiger interface (slsdet itself,
and a detector, are not needed). The fake writes slsReceiver raw files and PSI trim files with
struct, independently of calbench's readers."""
from __future__ import annotations

import struct
import sys
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

from calbench.contracts.trimfile import DAC_NAMES, write_trim_file
from calbench.iocs.errors import InstrumentFault, Refused
from calbench.iocs.hw.eiger import EigerHardware, open_eiger

NAMES = list(DAC_NAMES) + ["iodelay"]
VCMP = ["vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr"]


class detectorSettings(Enum):        # noqa: N801 - slsdet's spelling
    STANDARD = 0
    HIGHGAIN = 2
    UNDEFINED = 200


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


class FakeSlsEiger:
    """What the backend uses of slsdet.Eiger, for a 500k (two half modules)."""

    def __init__(self, n_modules=2):
        defaults = dict(zip(NAMES, [0, 2480, 3300, 1400, 4000, 2556, 1000, 1000, 0, 1000, 1100,
                                    1100, 1000, 1000, 2000, 1550, 650]))
        self.modules = [{"dacs": dict(defaults), "trimbits": np.zeros((256, 1024), np.int32),
                         "tau": 0} for _ in range(n_modules)]
        self.hostname = [f"beb{58 + i:03d}" for i in range(n_modules)]
        self.dacs = _Dacs(self)
        self.temp = _Temp()
        self.dr, self.exptime, self.period, self.frames = 16, 1.0, 0.0, 1
        self.settingspath, self.trimen, self.threshold = "/", [], -1
        self.settings = detectorSettings.UNDEFINED
        self.fpath = self.fname = ""
        self.findex, self.fwrite, self.rx_framesperfile = 0, False, 10000
        self.calls: list = []
        self.fail: RuntimeError | None = None

    def check(self):
        if self.fail is not None:
            raise self.fail

    def size(self):
        return len(self.modules)

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

    def loadTrimbits(self, prefix):                 # noqa: N802 - slsdet's name
        self.calls.append(("loadTrimbits", prefix))
        for host, m in zip(self.hostname, self.modules):
            raw = Path(f"{prefix}.sn{host[3:]}").read_bytes()
            ints = struct.unpack(f"<{len(raw) // 4}i", raw)
            m["dacs"].update(zip(NAMES, ints[:17]))
            m["tau"] = ints[17]
            m["trimbits"] = np.array(ints[18:], np.int32).reshape(256, 1024)

    def saveTrimbits(self, prefix):                 # noqa: N802
        for host, m in zip(self.hostname, self.modules):
            header = [m["dacs"][n] for n in NAMES] + [m["tau"]]
            Path(f"{prefix}.sn{host[3:]}").write_bytes(
                struct.pack("<18i", *header) + m["trimbits"].astype("<i4").tobytes())

    def setThresholdEnergy(self, e, settings, trimbits):    # noqa: N802
        self.check()
        self.calls.append(("setThresholdEnergy", e, settings, trimbits))
        self.threshold, self.settings = e, settings

    @property
    def ratecorr(self):
        return 0.0                                   # slsdet's getter rounds to microseconds

    @ratecorr.setter
    def ratecorr(self, seconds):
        self.calls.append(("ratecorr", seconds))

    def pulseChip(self, n):                          # noqa: N802
        self.calls.append(("pulseChip", n))

    def stop(self):
        self.calls.append(("stop",))

    # the image the fake detector "sees" in frame i; the receiver writes it per port
    def image(self, i):
        rows, cols = np.mgrid[0:512, 0:1024]
        return ((rows * 131 + cols * 7 + 1000 * i) % (2 ** min(self.dr, 16))).astype(np.uint32)

    def acquire(self):
        self.check()
        self.calls.append(("acquire", self.fpath, self.fname, self.findex))
        files = {port: bytearray() for port in range(4)}
        for i in range(self.frames):
            img = self.image(i)
            for hm in range(2):
                block = img[256:512] if hm == 0 else np.flipud(img[0:256])   # as read out
                for side in range(2):
                    port = block[:, 512 * side:512 * (side + 1)].ravel()
                    header = struct.pack("<QIIQQHHHHIHBB", i + 1, 0, 0, 0, 0, hm, 0, side, 0,
                                         0, 0, 3, 1) + bytes(64)
                    files[2 * hm + side] += header + _pack(port, self.dr)
        for port, data in files.items():
            Path(self.fpath, f"{self.fname}_d{port}_f0_{self.findex}.raw").write_bytes(data)


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
                                "trimen": [5400, 6400]}, settings_enum=detectorSettings)


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
    with pytest.raises(Refused, match="nope.sn058 not found"):
        hw.load_trimbits(str(tmp_path / "nope"))
    assert not any(c[0] == "loadTrimbits" for c in fake.calls)


def test_threshold_energy_calls_set_threshold_energy_with_the_settings(hw, fake, tmp_path):
    for e in (5400, 6400):
        for sn in ("058", "059"):
            write_trim_file(tmp_path / "settings" / "standard" / f"{e}eV" / f"noise.sn{sn}",
                            np.full(16, 1000), 660, 300, np.zeros((256, 1024)))
    assert fake.settingspath == str(tmp_path / "settings") and fake.trimen == [5400, 6400]
    hw.set_threshold_energy(6000)
    assert fake.calls[-1] == ("setThresholdEnergy", 6000, detectorSettings.STANDARD, True)
    assert hw.threshold_eV == 6000 and hw.loaded_settings == "standard"
    with pytest.raises(Refused, match="This energy 7000 not defined"):
        hw.set_threshold_energy(7000)
    hw.set_settings("highgain")
    with pytest.raises(Refused, match=r"highgain/5400eV/noise.sn058 not found"):
        hw.set_threshold_energy(5400)
    assert fake.calls[-1][1] == 6000                 # slsdet was not asked


@pytest.mark.parametrize("dr", [4, 8, 12, 16, 32])
def test_acquire_assembles_the_receivers_raw_files(hw, fake, dr):
    hw.set_dynamic_range(dr)
    hw.set_frames(3)
    hw.set_test_pulses(5)
    seen = []
    result = hw.acquire(lambda i, f: seen.append(i))
    assert result.frames.shape == (3, 512, 1024) and seen == [0, 1, 2]
    assert result.frames.dtype.itemsize == {4: 1, 8: 1, 12: 2, 16: 2, 32: 4}[dr]
    for i in range(3):
        np.testing.assert_array_equal(result.frames[i], fake.image(i))
    assert ("pulseChip", 5) in fake.calls
    assert not list(Path(fake.fpath).glob("*.raw")), "raw files are removed once read"


def test_garbage_from_the_receiver_is_a_fault(hw, fake):
    hw.set_dynamic_range(32)
    fake.acquire_orig = fake.acquire

    def short_files():
        fake.acquire_orig()
        p = Path(fake.fpath, f"{fake.fname}_d1_f0_{fake.findex}.raw")
        p.write_bytes(p.read_bytes()[:-10])
    fake.acquire = short_files
    with pytest.raises(InstrumentFault, match="not a whole number of .*-byte frames"):
        hw.acquire()


def test_slsdet_errors_become_refusals_or_faults(hw, fake):
    fake.fail = RuntimeError("Could not connect to beb058: timeout")
    with pytest.raises(InstrumentFault, match="reachable"):
        hw.set_vthreshold(1200)
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
