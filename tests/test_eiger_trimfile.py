"""PSI trim/settings files: bit compatibility with slsDetectorPackage's layout, round trips, bad files,
and slsDetector's trim-energy interpolation rules."""
from __future__ import annotations

import struct
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calbench.contracts.trimfile import (DAC_NAMES, LAYOUT_DACS, LAYOUT_DACS_IODELAY,
                                        LAYOUT_DACS_IODELAY_TAU, TRIM_FILE_BYTES,
                                        TRIM_FILE_LAYOUTS, TrimFile, TrimFileError,
                                        bracket_trim_energies, interpolate_trim,
                                        linear_interpolation, read_trim_file, round_half_away,
                                        serial_from_hostname, settings_for_energy,
                                        trim_file_path, write_trim_file)
import eiger_upstream

dacs_st = arrays(np.int32, 16, elements=st.integers(0, 4000))
trimbits_st = arrays(np.int8, (256, 1024), elements=st.integers(0, 63),
                     fill=st.integers(0, 63))


def test_layout_is_slsdetectors_int32_sequence(tmp_path):
    """A file assembled by hand with struct (16 DACs, iodelay, tau, trimbits) reads back field by
    field; and our writer produces exactly those bytes."""
    dacs = [0, 2500, 3422, 1400, 4000, 2556, 1125, 1155, 4000, 1140, 1100, 1100, 1150, 1140, 2000,
            1550]
    tb = (np.arange(256 * 1024) % 64).astype(np.int32).reshape(256, 1024)
    raw = struct.pack("<18i", *dacs, 660, 540) + struct.pack(f"<{tb.size}i", *tb.ravel())
    assert len(raw) == TRIM_FILE_BYTES == 1_048_648
    path = tmp_path / "noise.sn058"
    path.write_bytes(raw)
    tf = read_trim_file(path)
    assert tf.layout == LAYOUT_DACS_IODELAY_TAU
    assert tf.dacs.tolist() == dacs and tf.iodelay == 660 and tf.tau_ns == 540
    assert tf.dac("vrpreamp") == 3422 and tf.dac("vcp") == 1140
    np.testing.assert_array_equal(tf.trimbits, tb)
    out = write_trim_file(tmp_path / "copy.sn058", dacs, 660, 540, tb)
    assert out.read_bytes() == raw


@settings(max_examples=15, deadline=None)
@given(dacs=dacs_st, iodelay=st.integers(0, 4000), tau=st.integers(0, 2000), tb=trimbits_st)
def test_write_read_write_is_bit_exact(tmp_path_factory, dacs, iodelay, tau, tb):
    d = tmp_path_factory.mktemp("tf")
    first = write_trim_file(d / "a.sn000", dacs, iodelay, tau, tb)
    tf = read_trim_file(first)
    second = write_trim_file(d / "b.sn000", tf.dacs, tf.iodelay, tf.tau_ns, tf.trimbits)
    assert first.read_bytes() == second.read_bytes()
    np.testing.assert_array_equal(tf.trimbits, tb)
    assert tf.dacs.tolist() == dacs.tolist() and (tf.iodelay, tf.tau_ns) == (iodelay, tau)


def test_seventeen_dacs_as_slsdet_get_asarray_are_accepted(tmp_path):
    tb = np.zeros((256, 1024), int)
    asarray = np.array([*range(100, 1700, 100), 660], float)      # slsdet gives floats
    tf = read_trim_file(write_trim_file(tmp_path / "x.sn001", asarray, 660, 0, tb))
    assert tf.iodelay == 660 and tf.dacs[0] == 100
    with pytest.raises(TrimFileError, match="disagrees with iodelay"):
        write_trim_file(tmp_path / "y.sn001", asarray, 650, 0, tb)


@settings(max_examples=15, deadline=None)
@given(layout=st.sampled_from(sorted(TRIM_FILE_LAYOUTS.items())), dacs=dacs_st,
       iodelay=st.integers(0, 4000), tau=st.integers(0, 2000), tb=trimbits_st)
def test_each_layout_psi_ships_reads_field_by_field_and_says_which(tmp_path_factory, layout,
                                                                    dacs, iodelay, tau, tb):
    """Files of each size, assembled from the documented byte layout (int32 little-endian: 16
    DACs, then iodelay and tau where the layout has them, then the trimbits)."""
    size, name = layout
    header = {LAYOUT_DACS_IODELAY_TAU: [*dacs, iodelay, tau], LAYOUT_DACS_IODELAY: [*dacs, iodelay],
              LAYOUT_DACS: [*dacs]}[name]
    raw = struct.pack(f"<{len(header)}i", *header) + tb.astype("<i4").tobytes()
    assert len(raw) == size
    path = tmp_path_factory.mktemp("layout") / "noise.sn031"
    path.write_bytes(raw)
    tf = read_trim_file(path)
    assert tf.layout == name
    assert tf.dacs.tolist() == dacs.tolist()
    assert tf.iodelay == (None if name == LAYOUT_DACS else iodelay)
    assert tf.tau_ns == (tau if name == LAYOUT_DACS_IODELAY_TAU else 0)
    np.testing.assert_array_equal(tf.trimbits, tb)
    if tf.iodelay is not None:          # rewritten in the current layout, nothing else changes
        again = read_trim_file(write_trim_file(path.with_suffix(".sn032"), tf.dacs, tf.iodelay,
                                               tf.tau_ns, tf.trimbits))
        assert again.layout == LAYOUT_DACS_IODELAY_TAU
        assert (again.dacs.tolist(), again.iodelay, again.tau_ns) == (dacs.tolist(), iodelay,
                                                                      tf.tau_ns)
        np.testing.assert_array_equal(again.trimbits, tb)
    else:
        with pytest.raises(TrimFileError, match="no iodelay.*pass the detector's iodelay"):
            write_trim_file(path.with_suffix(".sn032"), tf.dacs, tf.iodelay, 0, tf.trimbits)


def test_the_written_layout_is_the_current_one(tmp_path):
    assert sorted(TRIM_FILE_LAYOUTS) == [1_048_640, 1_048_644, 1_048_648]
    path = write_trim_file(tmp_path / "t.sn000", np.zeros(16), 660, 200, np.zeros((256, 1024)))
    assert path.stat().st_size == TRIM_FILE_BYTES == 1_048_648


@settings(max_examples=25, deadline=None)
@given(data=st.one_of(st.binary(min_size=0, max_size=4096),
                      st.sampled_from([1_048_636, 1_048_642, 1_048_646, 1_048_652]).map(
                          lambda n: bytes(n))))
def test_other_sizes_are_refused_naming_the_three_layouts(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bad") / "noise.sn058"
    path.write_bytes(data)
    with pytest.raises(TrimFileError) as err:
        read_trim_file(path)
    message = str(err.value)
    assert f"has {len(data):,} bytes" in message and "truncated or not a trim file" in message
    for size, name in TRIM_FILE_LAYOUTS.items():
        assert f"{size:,} bytes ({name}" in message


def test_corrupt_trimbit_and_missing_file_are_named(tmp_path):
    tb = np.zeros((256, 1024), np.int32)
    path = write_trim_file(tmp_path / "noise.sn058", np.zeros(16), 660, 0, tb)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<i", raw, 4 * (18 + 5 * 1024 + 7), 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(TrimFileError, match="trimbit 99 at row 5, column 7"):
        read_trim_file(path)
    with pytest.raises(FileNotFoundError, match="nothing.sn058 not found"):
        read_trim_file(tmp_path / "nothing.sn058")


@pytest.mark.parametrize("kwargs, reason", [
    ({"trimbits": np.zeros((256, 512))}, "256 x 1024"),
    ({"trimbits": np.full((256, 1024), 64)}, "0..63"),
    ({"dacs": np.zeros(15)}, "need 16 DAC values"),
    ({"dacs": np.full(16, 0.5)}, "integers"),
])
def test_bad_content_is_refused_before_writing(tmp_path, kwargs, reason):
    args = {"dacs": np.zeros(16), "iodelay": 660, "tau": 0, "trimbits": np.zeros((256, 1024))}
    args.update(kwargs)
    with pytest.raises(TrimFileError, match=reason):
        write_trim_file(tmp_path / "t.sn000", **args)
    assert not list(tmp_path.iterdir())


def test_paths_and_serials_follow_slsdetector():
    assert serial_from_hostname("beb058") == "058"
    assert str(trim_file_path("/s/eiger", "standard", 5400, "58")) == \
        "/s/eiger/standard/5400eV/noise.sn058"
    with pytest.raises(ValueError, match="settings 'fast'"):
        trim_file_path("/s", "fast", 5400, 1)


def _tf(**dacs) -> TrimFile:
    """A trim file with PSI's standard DACs (some overridden), iodelay 660, zero trimbits."""
    base = {"vsvp": 0, "vtrim": 2500, "vrpreamp": 3300, "vrshaper": 1400, "vsvn": 4000,
            "vtgstv": 2556, "vcmp_ll": 1100, "vcmp_lr": 1100, "vcal": 4000, "vcmp_rl": 1100,
            "rxb_rb": 1100, "rxb_lb": 1100, "vcmp_rr": 1100, "vcp": 1100, "vcn": 2000,
            "vishaper": 1550, **dacs}
    return TrimFile(dacs=np.array([base[n] for n in DAC_NAMES], np.int32), iodelay=660,
                    tau_ns=0, trimbits=np.zeros((256, 1024), np.int32))


def test_interpolation_uses_slsdetector_rounding_and_dac_lists():
    a = TrimFile(dacs=_tf(vrpreamp=3422, vcmp_ll=1125, vtrim=2500, vcal=4000).dacs, iodelay=660,
                 tau_ns=540, trimbits=np.full((256, 1024), 30, np.int32))
    b = TrimFile(dacs=_tf(vrpreamp=3278, vcmp_ll=1150, vtrim=2600, vcal=3000).dacs, iodelay=660,
                 tau_ns=350, trimbits=np.full((256, 1024), 33, np.int32))
    with pytest.warns(UserWarning, match="vcal differs"):
        out = interpolate_trim(4950, 4500, a, 5400, b)
    # k = (y2 - y1)/(E2 - E1), m = y1 - k*E1, y = round(k*E + m), half away from zero
    assert out.dac("vrpreamp") == 3350          # 3422 - 144*0.5 = 3350
    assert out.dac("vcmp_ll") == 1138           # 1137.5 -> 1138
    assert out.dac("vtrim") == 2550
    assert out.dac("vcal") == 4000              # taken from the first file
    assert out.tau_ns == 445 and out.iodelay == 660
    assert np.all(out.trimbits == 32)           # 31.5 -> 32
    assert round_half_away([-1.5, -0.5, 0.5, 2.5]).tolist() == [-2, -1, 1, 3]
    # C round, not floor(x + 0.5): the largest double below 0.5 rounds to 0
    assert round_half_away([0.49999999999999994, -0.49999999999999994]).tolist() == [0, 0]


def _upstream(x: int, x1: int, x2: int, y1: int, y2: int) -> int:
    """Module::linearInterpolation in Python doubles (the same IEEE operations in the same
    order) with an exact half-away-from-zero rounding of the double it gives."""
    k = float(y2 - y1) / (x2 - x1)
    m = y1 - k * x1
    return int(Decimal(k * x + m).to_integral_value(ROUND_HALF_UP))


def test_exact_half_ties_round_as_slsdetector_does():
    """Between 5400 and 6400 eV at 5650 eV a trimbit pair 2 apart lands on an exact .5; which
    way it rounds is decided by the double operations, in slsDetectorPackage's order: (21, 23)
    gives k*x + m = 21.5 -> 22, (22, 20) gives 21.499999999999996 -> 21. The former formula
    round(k*E + y1 - k*E1) gave 21 and 22."""
    y1, y2 = np.array([21, 22, 22]), np.array([23, 20, 24])
    got = linear_interpolation(5650, 5400, 6400, y1, y2)
    assert got.tolist() == [_upstream(5650, 5400, 6400, a, b) for a, b in zip(y1, y2)]
    assert got.tolist() == [22, 21, 23]
    k = (y2 - y1) / 1000.0
    former = round_half_away(k * 5650 + y1 - k * 5400)
    assert former.tolist() == [21, 22, 22]


@settings(max_examples=300, deadline=None)
@given(e1=st.integers(1000, 20000), de=st.integers(1, 5000), frac=st.integers(1, 999),
       y1=st.integers(-5000, 5000), y2=st.integers(-5000, 5000))
def test_interpolation_is_bit_identical_to_the_upstream_double_arithmetic(e1, de, frac, y1, y2):
    e2 = e1 + de
    x = e1 + max(1, min(de - 1, de * frac // 1000)) if de > 1 else e1
    assert int(linear_interpolation(x, e1, e2, y1, y2)) == _upstream(x, e1, e2, y1, y2)


def test_interpolation_equals_a_compiled_c_build_of_the_formula_on_every_trimbit_pair(tmp_path):
    """Every pair of trimbits 0..63 at energies that make .5 ties common, through a C compiler
    (no fused multiply-add, as slsDetectorPackage's x86-64 build)."""
    exe = eiger_upstream.build(tmp_path)
    y1, y2 = np.meshgrid(np.arange(64), np.arange(64))
    for x, x1, x2 in [(5650, 5400, 6400), (4950, 4500, 5400), (5450, 4500, 6400),
                      (4700, 4500, 5400)]:
        np.testing.assert_array_equal(linear_interpolation(x, x1, x2, y1, y2),
                                      eiger_upstream.interpolate(exe, x, x1, x2, y1, y2))



def test_interpolation_refuses_files_whose_fixed_dacs_differ():
    a, b = _tf(), _tf(vcn=2100)
    with pytest.raises(TrimFileError, match="vcn differs"):
        interpolate_trim(5000, 4500, a, 5400, b)


def test_energy_selection_matches_or_brackets_and_refuses_outside():
    energies = [4500, 5400, 6400]
    assert bracket_trim_energies(5400, energies) == 5400
    assert bracket_trim_energies(6000, energies) == (5400, 6400)
    for e in (4499, 6401):
        with pytest.raises(ValueError, match=f"This energy {e} not defined for this module"):
            bracket_trim_energies(e, energies)
    loaded = []

    def load(e):
        loaded.append(e)
        return _tf(vrpreamp={4500: 3400, 5400: 3300, 6400: 3100}[e])

    assert settings_for_energy(6000, energies, load).dac("vrpreamp") == 3180
    assert loaded == [5400, 6400]


def test_geometries_place_half_modules_and_chips_like_psi():
    from calbench.contracts.eiger_geometry import geometry
    g = geometry("500k")
    assert g.half_module_slice(0) == (slice(256, 512), slice(0, 1024))      # top: beb058
    assert g.half_module_slice(1) == (slice(0, 256), slice(0, 1024))
    assert [g.chip_vcmp(c) for c in (0, 3, 4, 7)] == [(0, "vcmp_ll"), (0, "vcmp_rr"),
                                                      (1, "vcmp_rr"), (1, "vcmp_ll")]
    frame = g.chip_map.astype(float)
    np.testing.assert_array_equal(g.chip_sums(frame), np.arange(8) * 65536.0)
    nine = geometry("9M")
    assert nine.shape == (3072, 3072) and nine.n_half_modules == 36 and nine.n_chips == 144
    assert nine.half_module_origin(2 * 17) == (2560 + 256, 2048)            # module 17, top
    with pytest.raises(ValueError, match="unknown EIGER geometry '3M'"):
        geometry("3M")
