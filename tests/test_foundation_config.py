"""Lab configuration: the embedded defaults load; bad files are refused naming the key and the fix."""
from __future__ import annotations

import pytest

from calbench.cli import main
from calbench.config import DEFAULT_CONFIG, ConfigError, load_config
from calbench.instruments import INSTRUMENTS


def test_embedded_defaults_configure_every_known_instrument_as_simulated():
    cfg = load_config(DEFAULT_CONFIG)
    assert set(cfg.instruments) == set(INSTRUMENTS)
    assert all(i.sim for i in cfg.instruments.values())
    assert cfg.prefix_of("xraybox") == cfg.pv_prefix + "XRAY:"
    assert cfg.interfaces == ("127.0.0.1",)


@pytest.mark.parametrize("text, message", [
    ("[lab]\ntime_scale = -1\n", "lab.time_scale = -1.0 must be > 0"),
    ("[lab]\ndata_dirr = 'x'\n", "unknown key lab.data_dirr"),
    ("[instruments.xraybox]\nbackend = 'real'\n", "backend = 'real': must be 'sim' or 'hardware'"),
    ("[instruments.toaster]\n", "not a known instrument"),
    ("[instruments.xraybox]\nwarmup_s = 'long'\n", "instruments.xraybox.warmup_s = 'long' must be a float"),
    ("[lab\nname='x'", "not valid TOML"),
    ("[tiled]\nport = '8000'\n", "tiled.port = '8000' must be a int"),
])
def test_invalid_configuration_names_key_and_fix(tmp_path, text, message):
    path = tmp_path / "lab.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_missing_configuration_file_says_how_to_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CALBENCH_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not found; create it"):
        load_config()
    assert main(["ioc", "list"]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_environment_overrides_home_and_tiled(tmp_path, monkeypatch):
    monkeypatch.setenv("CALBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("CALBENCH_TILED_URI", "http://tiled.example:8000")
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.home == tmp_path and cfg.data_dir == tmp_path / "data"
    assert cfg.tiled_uri == "http://tiled.example:8000"


def test_run_metadata_names_credentials_without_their_value(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text("[instruments.caen]\nbackend = 'hardware'\nusername = 'labadmin'\n")
    meta = load_config(path).as_metadata()
    caen = meta["instruments"]["caen"]
    assert caen["username"] == "(credential, not stored)"
    assert caen["password_env"] == "CALBENCH_CAEN_PASSWORD"       # a variable's name, not a secret
    assert "labadmin" not in repr(meta)


def test_tiled_api_key_file_must_be_private(tmp_path, monkeypatch):
    monkeypatch.delenv("CALBENCH_TILED_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("abc123\n")
    key.chmod(0o644)
    path = tmp_path / "lab.toml"
    path.write_text(f"[tiled]\nuri = 'http://h:8000'\napi_key_file = '{key}'\n")
    with pytest.raises(ConfigError, match="readable by other users; `chmod 600"):
        load_config(path)
    key.chmod(0o600)
    assert load_config(path).tiled_api_key == "abc123"
