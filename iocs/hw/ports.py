"""Finding and opening the bench's ports: USB-serial adapters by VID:PID (as the reference tools do),
VISA resources for the SCPI instruments, pyserial ports (or URLs) for the BatMet."""
from __future__ import annotations

from pathlib import Path

from calbench.contracts.errors import InstrumentFault

SIM_YAML = Path(__file__).with_name("sim_instruments.yaml")


def parse_vid_pid(vid_pid: str) -> tuple[int, int]:
    """'067b:2303' -> (0x067b, 0x2303)."""
    try:
        vid, pid = (int(part, 16) for part in vid_pid.split(":"))
    except ValueError:
        raise InstrumentFault(f"USB id {vid_pid!r} is not VID:PID in hex (e.g. '067b:2303'); "
                              "fix usb_vid_pid in the lab configuration") from None
    return vid, pid


def find_usb_serial_port(vid_pid: str, what: str, setting: str) -> str:
    """The device path of the USB-serial adapter with this VID:PID.

    what: the instrument, for the message; setting: the configuration key that names a port
    explicitly (the remedy when several or no adapters match)."""
    from serial.tools import list_ports

    if not vid_pid:
        raise InstrumentFault(f"no port configured for the {what}; set {setting} in the lab "
                              "configuration (or usb_vid_pid to find its USB-serial adapter)")
    vid, pid = parse_vid_pid(vid_pid)
    found = [p.device for p in list_ports.comports() if p.vid == vid and p.pid == pid]
    if not found:
        raise InstrumentFault(f"no USB-serial adapter {vid_pid} found for the {what}; plug it in, "
                              f"or name the port with {setting} in the lab configuration")
    if len(found) > 1:
        raise InstrumentFault(f"several USB-serial adapters {vid_pid} found for the {what} "
                              f"({', '.join(found)}); name one with {setting}")
    return found[0]


def visa_library_arg(visa_library: str) -> str:
    """The ResourceManager argument: '' (pyvisa's default), '@py', 'file.yaml@sim', or 'sim'
    for the simulated instruments shipped with calbench (iocs/hw/sim_instruments.yaml)."""
    return f"{SIM_YAML}@sim" if visa_library == "sim" else visa_library


def open_visa_resource(*, resource: str, visa_library: str, baud_rate: int, timeout_s: float,
                       vid_pid: str, what: str, setting: str, dtr_dsr: bool = False):
    """Open a SCPI instrument's VISA resource with the bench's serial settings (8N1, writes end in
    CR LF, reads in LF). With no resource name, the USB-serial adapter is found by VID:PID."""
    import pyvisa
    from pyvisa import constants

    if not resource:
        resource = f"ASRL{find_usb_serial_port(vid_pid, what, setting)}::INSTR"
    try:
        rm = pyvisa.ResourceManager(visa_library_arg(visa_library)) if visa_library \
            else pyvisa.ResourceManager()
        res = rm.open_resource(resource)
    except (pyvisa.errors.Error, OSError, ValueError) as exc:
        raise InstrumentFault(f"cannot open {resource} for the {what}: {exc}; check the cable and "
                              f"{setting} (a VISA resource name such as ASRL/dev/ttyUSB0::INSTR)"
                              ) from None
    res.write_termination = "\r\n"
    res.read_termination = "\n"
    res.timeout = int(timeout_s * 1000)
    if resource.upper().startswith("ASRL"):
        for name, value in (("baud_rate", baud_rate), ("data_bits", 8),
                            ("parity", constants.Parity.none),
                            ("stop_bits", constants.StopBits.one)):
            _set_attribute(res, name, value)
        if dtr_dsr:   # the 34401A paces its RS-232 output with DTR/DSR
            _set_attribute(res, "flow_control", constants.ControlFlow.dtr_dsr)
    return res


def _set_attribute(res, name: str, value) -> None:
    try:
        setattr(res, name, value)
    except Exception:  # simulated or non-serial sessions do not implement every attribute
        pass


def open_serial_port(*, port: str, baud_rate: int, timeout_s: float, vid_pid: str, what: str,
                     setting: str):
    """Open a pyserial port (a device path or a pyserial URL such as loop:// or socket://host:port);
    with no port, the USB-serial adapter is found by VID:PID."""
    import serial

    if not port:
        port = find_usb_serial_port(vid_pid, what, setting)
    try:
        return serial.serial_for_url(port, baudrate=baud_rate, timeout=timeout_s,
                                     write_timeout=timeout_s)
    except (serial.SerialException, ValueError) as exc:
        raise InstrumentFault(f"cannot open {port} for the {what}: {exc}; check the USB cable "
                              f"and {setting}") from None


def lazy_visa_connection(s: dict, *, what: str, setting: str):
    """(connect, port description) for a SCPI instrument over RS-232 from its lab settings
    (resource or usb_vid_pid, visa_library, baud_rate, timeout_s); the port opens on first use,
    so an IOC starts (and reports) without the instrument."""
    def connect():
        return open_visa_resource(resource=s["resource"], visa_library=s["visa_library"],
                                  baud_rate=int(s["baud_rate"]), timeout_s=float(s["timeout_s"]),
                                  vid_pid=s["usb_vid_pid"], what=what, setting=setting, dtr_dsr=True)

    port = s["resource"] or f"USB-serial adapter {s['usb_vid_pid'] or '(not configured)'}"
    return connect, port
