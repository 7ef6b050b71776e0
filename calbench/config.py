"""The lab configuration (one TOML file): instruments, prefixes, sim or hardware, directories, tiled.

Resolution order for the file: the `path` argument, then $CALBENCH_CONFIG, then ./lab.toml, then the
embedded defaults (calbench/default_lab.toml: every instrument simulated, local tiled). Environment
variables override single keys: CALBENCH_HOME (lab.home), CALBENCH_PV_PREFIX (lab.pv_prefix),
CALBENCH_TILED_URI / CALBENCH_TILED_API_KEY (an external tiled server). An instrument's directory
setting left empty ("data_dir", "settings_dir", ...) means the lab's place for it:
<data_dir>/<instrument> for data_dir, <home>/<settings>/<instrument> for settings_dir.

Who may write an instrument's PVs: `write_users` and `write_hosts` (in [lab] for every instrument,
or in an [instruments.<name>] section for one); by default the lab's own user (who runs calbench)
on the local host. Everybody else reads only. Hosts are names or addresses; the IOC compares them
with the address a client connects from, not with the name it claims.

Validation names the key and the fix, e.g.
    lab.toml: [instruments.eiger] backend = 'real': must be 'sim' or 'hardware'
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import pwd
import socket
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from calbench.instruments import INSTRUMENTS

DEFAULT_CONFIG = Path(__file__).with_name("default_lab.toml")


def private_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` (and parents) accessible to its owner only (mode 0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class ConfigError(ValueError):
    """The lab configuration is missing or invalid; the message names the key and the fix."""


def lab_user() -> str:
    """Who runs calbench (the user a CA client of this session reports)."""
    return getpass.getuser()


@dataclass(frozen=True)
class WriteAccess:
    """The users and hosts that may write an instrument's PVs; others read only."""
    users: tuple[str, ...]
    hosts: tuple[str, ...]

    @classmethod
    def default(cls) -> "WriteAccess":
        # the login name and the real uid's name differ under `su`: either is the lab's user
        return cls(tuple(dict.fromkeys((lab_user(), pwd.getpwuid(os.getuid()).pw_name))),
                   ("localhost",))

    @cached_property
    def addresses(self) -> frozenset[str]:
        """The hosts' addresses (a name that does not resolve allows nothing)."""
        found = set()
        for host in self.hosts:
            try:
                found.update(info[4][0] for info in socket.getaddrinfo(host, None))
            except OSError:
                continue
        return frozenset(found)

    def allows(self, address: str, user: str) -> bool:
        """May `user` connecting from `address` write?"""
        if user not in self.users:
            return False
        if address in self.addresses:
            return True
        try:        # every loopback address is the local host
            return ipaddress.ip_address(address).is_loopback and any(
                ipaddress.ip_address(a).is_loopback for a in self.addresses)
        except ValueError:
            return False


@dataclass(frozen=True)
class InstrumentConfig:
    name: str
    backend: str            # "sim" | "hardware"
    prefix: str             # instrument prefix, without the lab-wide pv_prefix
    settings: dict[str, Any] = field(default_factory=dict)
    access: WriteAccess = field(default_factory=WriteAccess.default)

    @property
    def sim(self) -> bool:
        return self.backend == "sim"


@dataclass(frozen=True)
class QueueConfig:
    """Where the queue server listens: Redis (its state) and the RE Manager's 0MQ sockets."""
    bind: str = "127.0.0.1"           # "*" to take clients from other machines (see README)
    redis_port: int = 60379           # the lab's own Redis (started by `calbench up`)
    control_port: int = 60615         # RE Manager control socket (qserver's default)
    info_port: int = 60625            # RE Manager console-output socket (qserver's default)


@dataclass(frozen=True)
class LabConfig:
    source: Path
    name: str
    home: Path
    data_dir: Path
    results_dir: Path
    pv_prefix: str
    interfaces: tuple[str, ...]
    time_scale: float
    seed: int
    operator: str
    tiled_uri: str
    tiled_api_key: str
    tiled_port: int
    tiled_catalog: str
    instruments: dict[str, InstrumentConfig]
    queue: QueueConfig = QueueConfig()
    proposal: str = ""           # lab.proposal: default of RE.md["proposal"]
    tiled_stop_timeout_s: float = 30.0

    @property
    def journal_dir(self) -> Path:
        """Write-ahead journal of runs (calbench.journal)."""
        return self.home / "journal"

    def prefix_of(self, instrument: str) -> str:
        """Full PV prefix of an instrument (lab prefix + instrument prefix)."""
        try:
            return self.pv_prefix + self.instruments[instrument].prefix
        except KeyError:
            raise ConfigError(
                f"{self.source}: no [instruments.{instrument}] section; add one "
                f"(see {DEFAULT_CONFIG} for an example)") from None

    def with_overrides(self, **changes) -> "LabConfig":
        from dataclasses import replace
        return replace(self, **changes)

    def as_metadata(self) -> dict:
        """A JSON-able summary stored in every run's start document."""
        return {
            "source": str(self.source), "name": self.name, "pv_prefix": self.pv_prefix,
            "data_dir": str(self.data_dir), "results_dir": str(self.results_dir),
            "instruments": {n: {"backend": i.backend, "prefix": i.prefix, **_jsonable(i.settings)}
                            for n, i in self.instruments.items()},
        }


# Settings that are credentials: run metadata names them but never carries their value.
_CREDENTIALS = ("username", "user", "login", "password", "api_key", "token", "secret")
NOT_STORED = "(credential, not stored)"


def is_credential(key: str) -> bool:
    """A setting holding a login or secret (`password_env`, naming a variable, is not one)."""
    return not key.endswith("_env") and any(c in key.lower() for c in _CREDENTIALS)


def _jsonable(d: dict) -> dict:
    return {k: (NOT_STORED if is_credential(k) else
                v if isinstance(v, (str, int, float, bool, list)) else str(v))
            for k, v in d.items()}


_LAB_KEYS = {"name": str, "home": str, "data_dir": str, "results_dir": str, "pv_prefix": str,
             "interfaces": list, "time_scale": (int, float), "seed": int, "operator": str,
             "proposal": str, "write_users": list, "write_hosts": list}
_ACCESS_KEYS = ("write_users", "write_hosts")
_TILED_KEYS = {"uri": str, "port": int, "catalog": str, "api_key": str, "api_key_file": str,
               "stop_timeout_s": (int, float)}
_QUEUE_KEYS = {"bind": str, "redis_port": int, "control_port": int, "info_port": int}


def _check_keys(where: str, table: dict, allowed: dict, source: Path) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {where}.{key}; allowed keys are "
                              f"{', '.join(sorted(allowed))}")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] is not bool:
            want = allowed[key]
            want = " or ".join(t.__name__ for t in want) if isinstance(want, tuple) else want.__name__
            raise ConfigError(f"{source}: {where}.{key} = {value!r} must be a {want}")


def _access(table: dict, default: WriteAccess, where: str, source: Path) -> WriteAccess:
    """write_users / write_hosts of a section (each falls back to `default`'s)."""
    lists = {}
    for key, fallback in (("write_users", default.users), ("write_hosts", default.hosts)):
        value = table.get(key, list(fallback))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{source}: {where}.{key} = {value!r} must be a list of names, e.g. "
                              f"[\"{lab_user()}\"] or [\"localhost\"]")
        lists[key] = tuple(value)
    return WriteAccess(lists["write_users"], lists["write_hosts"])


def load_config(path: str | os.PathLike | None = None) -> LabConfig:
    """Read and validate the lab configuration (see the module docstring for where it comes from)."""
    if path is None:
        path = os.environ.get("CALBENCH_CONFIG") or (Path("lab.toml") if Path("lab.toml").is_file()
                                                     else DEFAULT_CONFIG)
    source = Path(path).expanduser()
    if not source.is_file():
        raise ConfigError(f"lab configuration {source} not found; create it (start from "
                          f"{DEFAULT_CONFIG}) or unset CALBENCH_CONFIG to use the embedded defaults")
    try:
        raw = tomllib.loads(source.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}; fix the syntax at that line") from None
    return parse_config(raw, source)


def parse_config(raw: dict, source: Path = DEFAULT_CONFIG) -> LabConfig:
    unknown = set(raw) - {"lab", "tiled", "queue", "instruments"}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; "
                          "allowed are [lab], [tiled], [queue] and [instruments.<name>]")
    lab = raw.get("lab", {})
    tiled = raw.get("tiled", {})
    _check_keys("lab", lab, _LAB_KEYS, source)
    _check_keys("tiled", tiled, _TILED_KEYS, source)
    _check_keys("queue", raw.get("queue", {}), _QUEUE_KEYS, source)

    home = Path(os.environ.get("CALBENCH_HOME") or lab.get("home", "~/.local/share/calbench"))
    home = home.expanduser()
    if not home.is_absolute():
        home = (source.parent / home).resolve()

    def in_home(key: str, default: str) -> Path:
        p = Path(lab.get(key, default)).expanduser()
        return p if p.is_absolute() else home / p

    time_scale = float(lab.get("time_scale", 1.0))
    if time_scale <= 0:
        raise ConfigError(f"{source}: lab.time_scale = {time_scale} must be > 0 (1 = real time)")
    pv_prefix = os.environ.get("CALBENCH_PV_PREFIX", lab.get("pv_prefix", "CB:"))
    interfaces = tuple(lab.get("interfaces", ["127.0.0.1"]))
    if not interfaces or not all(isinstance(i, str) for i in interfaces):
        raise ConfigError(f"{source}: lab.interfaces must be a non-empty list of addresses, "
                          "e.g. [\"127.0.0.1\"]")

    lab_access = _access(lab, WriteAccess.default(), "lab", source)
    instruments = {}
    for name, table in raw.get("instruments", {}).items():
        spec = INSTRUMENTS.get(name)
        if spec is None:
            raise ConfigError(f"{source}: [instruments.{name}] is not a known instrument; "
                              f"known: {', '.join(sorted(INSTRUMENTS))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: instruments.{name} must be a table [instruments.{name}]")
        backend = table.get("backend", "sim")
        if backend not in ("sim", "hardware"):
            raise ConfigError(f"{source}: [instruments.{name}] backend = {backend!r}: "
                              "must be 'sim' or 'hardware'")
        prefix = table.get("prefix", spec.default_prefix)
        if not isinstance(prefix, str) or not prefix or " " in prefix:
            raise ConfigError(f"{source}: [instruments.{name}] prefix = {prefix!r}: must be a "
                              f"non-empty PV prefix without spaces, e.g. {spec.default_prefix!r}")
        settings = dict(spec.settings)
        for key, value in table.items():
            if key in ("backend", "prefix", *_ACCESS_KEYS):
                continue
            if key not in spec.settings:
                raise ConfigError(f"{source}: unknown key instruments.{name}.{key}; allowed keys "
                                  f"are backend, prefix, {', '.join(_ACCESS_KEYS)}, "
                                  f"{', '.join(sorted(spec.settings))}")
            default = spec.settings[key]
            if default is not None and not isinstance(value, type(default)) and not (
                    isinstance(default, float) and isinstance(value, int)):
                raise ConfigError(f"{source}: instruments.{name}.{key} = {value!r} must be a "
                                  f"{type(default).__name__} (default {default!r})")
            settings[key] = value
        for key, value in settings.items():
            # an empty directory setting means "the lab's place for it"
            if key.endswith("_dir") and value == "":
                settings[key] = str(in_home("data_dir", "data") / name if key == "data_dir"
                                    else home / key[:-4] / name)
        instruments[name] = InstrumentConfig(
            name, backend, prefix, settings,
            _access(table, lab_access, f"instruments.{name}", source))

    return LabConfig(
        source=source, name=lab.get("name", "calbench lab"), home=home,
        data_dir=in_home("data_dir", "data"), results_dir=in_home("results_dir", "results"),
        pv_prefix=pv_prefix, interfaces=interfaces, time_scale=time_scale,
        seed=int(lab.get("seed", 0)), operator=lab.get("operator", ""),
        tiled_uri=os.environ.get("CALBENCH_TILED_URI", tiled.get("uri", "")),
        tiled_api_key=_tiled_api_key(tiled, source),
        tiled_port=int(tiled.get("port", 8009)), tiled_catalog=tiled.get("catalog", "raw"),
        instruments=instruments, queue=QueueConfig(**raw.get("queue", {})),
        proposal=lab.get("proposal", ""),
        tiled_stop_timeout_s=_positive(tiled, "stop_timeout_s", 30.0, source),
    )


def _positive(table: dict, key: str, default: float, source: Path) -> float:
    value = float(table.get(key, default))
    if value <= 0:
        raise ConfigError(f"{source}: tiled.{key} = {value} must be > 0 (seconds)")
    return value


def _tiled_api_key(tiled: dict, source: Path) -> str:
    """The external server's key: $CALBENCH_TILED_API_KEY, else [tiled] api_key_file (a file only
    its owner may read), else [tiled] api_key."""
    if os.environ.get("CALBENCH_TILED_API_KEY"):
        return os.environ["CALBENCH_TILED_API_KEY"]
    if tiled.get("api_key_file"):
        path = Path(tiled["api_key_file"]).expanduser()
        if not path.is_absolute():
            path = source.parent / path
        try:
            mode = path.stat().st_mode & 0o077
        except FileNotFoundError:
            raise ConfigError(f"{source}: tiled.api_key_file {path} not found; create it "
                              "(mode 0600) or set CALBENCH_TILED_API_KEY") from None
        if mode:
            raise ConfigError(f"{source}: tiled.api_key_file {path} is readable by other users; "
                              f"`chmod 600 {path}`")
        return path.read_text().strip()
    return tiled.get("api_key", "")
