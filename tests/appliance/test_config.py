"""Settings: the TOML file, APPLIANCE_* variables, per-model sections and their mistakes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.config import SettingsError, cors_origin, load_settings
from tests.conftest import run_cli

WriteConfig = Callable[[str], Path]


@pytest.fixture()
def write_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> WriteConfig:
    """Point APPLIANCE_CONFIG at a fresh file, with no other APPLIANCE_* variable set."""
    for name in [n for n in os.environ if n.upper().startswith("APPLIANCE_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "config.toml"
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))

    def write(text: str) -> Path:
        path.write_text(text)
        return path

    return write


def error_of(**overrides: object) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        load_settings(**overrides)
    assert "\n" not in str(caught.value) and "\n" not in caught.value.hint
    return caught.value


# -- unknown keys ----------------------------------------------------------------------------

def test_unknown_key_names_the_key_the_file_and_a_near_name(write_config: WriteConfig) -> None:
    path = write_config('contex_length = 4096\n')
    error = error_of()
    assert "unknown setting contex_length" in str(error) and str(path) in str(error)
    assert "context_length" in error.hint


def test_unknown_key_in_a_model_section(write_config: WriteConfig) -> None:
    path = write_config('[models.qwen3-8b]\ngpu_layer = 10\n')
    error = error_of()
    assert "unknown setting models.qwen3-8b.gpu_layer" in str(error) and str(path) in str(error)
    assert "gpu_layers" in error.hint


def test_appliance_variables_of_other_tools_are_not_settings(write_config: WriteConfig,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    # The installer and tests/run read these; the daemon must start beside them.
    monkeypatch.setenv("APPLIANCE_WHEELHOUSE", "/tmp/wheels")
    monkeypatch.setenv("APPLIANCE_TEST_VENV", ".venv")
    write_config("port = 9000\n")
    assert load_settings().port == 9000


# -- per-model sections ----------------------------------------------------------------------

def test_model_sections_match_ids_in_any_case(write_config: WriteConfig) -> None:
    write_config('[models."Qwen3-8B-Q4_K_M"]\ncontext_length = 2048\nenable_thinking = false\n')
    settings = load_settings()
    for name in ("qwen3-8b-q4_k_m", "Qwen3-8B-Q4_K_M"):
        overrides = settings.model_overrides(name)
        assert overrides.context_length == 2048 and overrides.enable_thinking is False


def test_two_sections_for_one_id_are_refused(write_config: WriteConfig) -> None:
    write_config('[models."Qwen3-8B"]\ngpu_layers = 1\n[models.qwen3-8b]\ngpu_layers = 2\n')
    error = error_of()
    assert "models" in str(error) and "qwen3-8b" in str(error)


def test_unprefixed_variables_never_reach_model_settings(write_config: WriteConfig,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTEXT_LENGTH", "999999")
    monkeypatch.setenv("GPU_LAYERS", "7")
    monkeypatch.setenv("ENABLE_THINKING", "false")
    write_config('[models.tiny]\nenable_thinking = true\n')
    settings = load_settings()
    tiny, other = settings.model_overrides("tiny"), settings.model_overrides("other")
    assert (tiny.context_length, tiny.gpu_layers, tiny.enable_thinking) == (None, None, True)
    assert (other.context_length, other.gpu_layers, other.enable_thinking) == (None, None, None)
    assert settings.context_length == "auto"  # nor into the daemon-wide one


def test_model_section_values_are_checked(write_config: WriteConfig) -> None:
    write_config('[models.tiny]\ncontext_length = 16\n')
    assert "models.tiny.context_length" in str(error_of())


# -- malformed files and values --------------------------------------------------------------

def test_toml_syntax_error_is_one_line_naming_the_file(write_config: WriteConfig) -> None:
    path = write_config('port = 8471\nhost = "127.0.0.1\n')
    error = error_of()
    assert str(path) in str(error) and "line 2" in str(error)


def test_unreadable_config_is_one_line(write_config: WriteConfig) -> None:
    path = write_config("")
    path.unlink()
    path.mkdir()  # a folder where the file should be
    assert str(path) in str(error_of())


def test_wrong_type_in_the_file_names_file_and_key(write_config: WriteConfig) -> None:
    path = write_config('port = "eighty"\n')
    error = error_of()
    assert str(error).startswith(f"bad setting port in {path}:")


def test_wrong_type_in_the_environment_names_the_variable(write_config: WriteConfig,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write_config('port = 9000\n')
    monkeypatch.setenv("APPLIANCE_PARALLEL", "many")
    assert str(error_of()).startswith("bad setting parallel in APPLIANCE_PARALLEL:")


def test_command_line_values_are_named_as_such(write_config: WriteConfig) -> None:
    write_config("")
    assert "command line" in str(error_of(port=0))


def test_cli_reports_a_broken_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[models.tiny\ncontext_length = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("APPLIANCE_")}
    result = run_cli("status", env={**env, "APPLIANCE_CONFIG": str(config)}, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert str(config) in lines[0] and lines[0].startswith("appliance: error:")
    # 78 (EX_CONFIG): the units' RestartPreventExitStatus, so systemd does not retry a typo.
    assert result.returncode == 78


# -- context per slot ------------------------------------------------------------------------

def test_context_length_is_documented_as_per_slot(write_config: WriteConfig) -> None:
    from appliance.config import ModelOverrides, Settings, describe_settings

    assert "per slot" in (Settings.model_fields["context_length"].description or "")
    assert "per slot" in (ModelOverrides.model_fields["context_length"].description or "")
    assert "per slot" in describe_settings()


# -- CORS origins ----------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["*", "null", "http://localhost:3000/", "http://x/app",
                                    "localhost:3000", "http://user@localhost", "http://x:99999",
                                    "http://", "http://x?y=1", "http://x:", "//x", ""])
def test_cors_origin_must_be_scheme_host_port(origin: str, write_config: WriteConfig,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="scheme://host"):
        cors_origin(origin)
    write_config(f"cors_origins = [{origin!r}]\n".replace("'", '"'))
    error = error_of()
    assert str(error).startswith("bad setting cors_origins") and "scheme://host" in str(error)


@pytest.mark.parametrize(("origin", "kept"), [
    ("http://localhost:3000", "http://localhost:3000"),
    ("https://Example.COM", "https://example.com"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("chrome-extension://abcdef", "chrome-extension://abcdef"),
])
def test_cors_origins_accepted_as_browsers_send_them(origin: str, kept: str,
                                                     write_config: WriteConfig) -> None:
    write_config(f'cors_origins = ["{origin}"]\n')
    assert load_settings().cors_origins == [kept]


# -- [upstreams.NAME] -------------------------------------------------------------------------

def test_upstream_section_is_read(write_config: WriteConfig, tmp_path: Path) -> None:
    key = tmp_path / "team.key"
    key.write_text("secret\n")
    key.chmod(0o600)
    write_config(f'[upstreams.team]\nurl = "https://gpu-box:8000/v1/"\n'
                 f'api_key_file = "{key}"\nmodels = ["Qwen/Qwen3-32B"]\ntimeout_s = 20\n'
                 '[upstreams.lab]\nurl = "http://10.0.0.5/v1"\n')
    settings = load_settings()
    team = settings.upstreams["team"]
    assert team.url == "https://gpu-box:8000/v1" and team.models == ["Qwen/Qwen3-32B"]
    assert team.timeout_s == 20 and settings.upstreams["lab"].models == "*"
    assert settings.read_upstream_keys() == {"team": "secret", "lab": None}


def test_unknown_key_in_an_upstream_section(write_config: WriteConfig) -> None:
    path = write_config('[upstreams.team]\nurl = "http://box/v1"\nmodel = ["a"]\n')
    error = error_of()
    assert "unknown setting upstreams.team.model" in str(error) and str(path) in str(error)
    assert "models" in error.hint


@pytest.mark.parametrize("url", ["ftp://box/v1", "box:8000/v1", "http://user:pw@box/v1",
                                 "http://box/v1?x=1", "http://:80/v1", "http://box:99999/v1"])
def test_upstream_url_must_be_http_base_url(url: str, write_config: WriteConfig) -> None:
    write_config(f'[upstreams.team]\nurl = "{url}"\n')
    error = error_of()
    assert "upstreams.team.url" in str(error) and "http(s) base URL" in str(error)


@pytest.mark.parametrize("models", ['[]', '["a", ""]', '"all"', '["x\\ny"]'])
def test_upstream_models_are_ids_or_star(models: str, write_config: WriteConfig) -> None:
    write_config(f'[upstreams.team]\nurl = "http://box/v1"\nmodels = {models}\n')
    assert "upstreams.team.models" in str(error_of())


def test_upstream_key_file_readable_by_others_is_refused(write_config: WriteConfig,
                                                         tmp_path: Path) -> None:
    key = tmp_path / "team.key"
    key.write_text("secret\n")
    key.chmod(0o640)
    write_config(f'[upstreams.team]\nurl = "http://box/v1"\napi_key_file = "{key}"\n')
    with pytest.raises(ValueError, match=r"upstreams\.team\.api_key_file.*chmod 600"):
        load_settings().read_upstream_keys()
