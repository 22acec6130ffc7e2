"""Settings: flags over ATTNSERVE_* variables over defaults, and bounds with messages that echo the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, SettingsError, build_parser


def test_defaults_without_flags_or_environment() -> None:
    settings = Settings.from_sources([], {})
    assert settings == Settings()
    assert settings.port == 50051
    assert settings.metrics_port == 8002
    assert settings.model_repository == Path("models")
    assert settings.batching == "continuous"


def test_environment_overrides_default() -> None:
    settings = Settings.from_sources(
        [],
        {
            "ATTNSERVE_PORT": "50099",
            "ATTNSERVE_MODEL_REPOSITORY": "/srv/models",
            "ATTNSERVE_BATCHING": "Request",
            "ATTNSERVE_DRAIN_GRACE_SECONDS": "2.5",
            "ATTNSERVE_LOG_LEVEL": "debug",
        },
    )
    assert settings.port == 50099
    assert settings.model_repository == Path("/srv/models")
    assert settings.batching == "request"
    assert settings.drain_grace_seconds == 2.5
    assert settings.log_level == "DEBUG"


def test_flag_wins_over_environment() -> None:
    settings = Settings.from_sources(
        ["--port", "50100", "--metrics-port=0", "--provider", "cpu"],
        {"ATTNSERVE_PORT": "50099", "ATTNSERVE_METRICS_PORT": "9000", "ATTNSERVE_MAX_BEAM_SIZE": "4"},
    )
    assert settings.port == 50100
    assert settings.metrics_port == 0
    assert settings.provider == "cpu"
    assert settings.max_beam_size == 4  # only in the environment, so the environment applies


def test_unrelated_environment_is_ignored() -> None:
    assert Settings.from_sources([], {"PORT": "1", "ATTNSERVE": "x", "HOME": "/root"}) == Settings()


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"ATTNSERVE_PORT": "70000"}, "ATTNSERVE_PORT=70000: port must be 1..65535"),
        (["--port", "0"], {}, "--port=0: port must be 1..65535"),
        ([], {"ATTNSERVE_PORT": "http"}, "ATTNSERVE_PORT=http: port must be an integer"),
        (["--batching", "dynamic"], {}, "--batching=dynamic: batching must be one of continuous, request, none"),
        ([], {"ATTNSERVE_PROVIDER": "tpu"}, "ATTNSERVE_PROVIDER=tpu: provider must be one of auto, cpu, cuda"),
        (["--max-beam-size", "0"], {}, "--max-beam-size=0: max_beam_size must be 1..4096"),
        (["--drain-grace-seconds", "-1"], {}, "--drain-grace-seconds=-1: drain_grace_seconds must be 0.0..3600.0"),
        (["--batch-delay-ms", "inf"], {}, "--batch-delay-ms=inf: batch_delay_ms must be a finite number"),
        (
            [],
            {"ATTNSERVE_MAX_QUEUE_WAIT_MS": "-5"},
            "ATTNSERVE_MAX_QUEUE_WAIT_MS=-5: max_queue_wait_ms must be 0.0..3600000.0",
        ),
        ([], {"ATTNSERVE_LOG_LEVEL": "loud"}, "log_level must be one of DEBUG, INFO"),
        (
            ["--max-receive-message-bytes", "10"],
            {},
            "--max-receive-message-bytes=10: max_receive_message_bytes must be 1024..",
        ),
        (["--default-model", "../etc"], {}, "default_model must be a model name"),
    ],
)
def test_bad_values_name_their_source_value_and_bound(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(argv, environ)
    assert message in str(raised.value)


def test_bad_environment_value_is_not_checked_when_a_flag_overrides_it() -> None:
    assert Settings.from_sources(["--port", "50200"], {"ATTNSERVE_PORT": "70000"}).port == 50200


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(SettingsError, match=r"port=0: port must be 1\.\.65535"):
        Settings(port=0)
    with pytest.raises(SettingsError, match="metrics_port=7000 and port=7000 must differ"):
        Settings(port=7000, metrics_port=7000)
    with pytest.raises(SettingsError, match="http_port=8002 must differ from port=50051 and metrics_port=8002"):
        Settings(http_port=8002)
    assert (Settings().http_port, Settings(http_port=0).http_port) == (8000, 0)
    with pytest.raises(SettingsError, match=r"http_body_timeout_seconds=0: http_body_timeout_seconds must be"):
        Settings(http_body_timeout_seconds=0)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_unknown_flag_exits_with_usage_error() -> None:
    with pytest.raises(SystemExit) as raised:
        Settings.from_sources(["--no-such-flag"], {})
    assert raised.value.code == 2


def test_every_field_has_a_flag_with_help_naming_its_environment_variable() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"ATTNSERVE_{name.upper()}" in help_text.replace("ATTNSERVE_ ", "ATTNSERVE_")


def test_every_setting_is_described_and_secrets_are_never_shown() -> None:
    assert all(setting.description for setting in Settings.model_fields.values())
    settings = Settings.from_sources([], {"ATTNSERVE_AUTH_TOKENS": "s3cret"})
    assert settings.auth_tokens.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    with pytest.raises(SettingsError, match=r"^ATTNSERVE_PORT=x: port must be an integer$"):
        Settings.from_sources([], {"ATTNSERVE_AUTH_TOKENS": "s3cret", "ATTNSERVE_PORT": "x"})


def test_values_are_trimmed_and_only_upper_case_variables_count() -> None:
    settings = Settings.from_sources(
        ["--default-model", " dates "], {"ATTNSERVE_HOST": " 127.0.0.1 ", "ATTNSERVE_REFLECTION": " no "}
    )
    assert (settings.host, settings.default_model, settings.reflection) == ("127.0.0.1", "dates", False)
    assert Settings.from_sources([], {"attnserve_port": "1234", "Attnserve_Port": "1235"}).port == 50051


def test_an_unknown_setting_in_code_is_named() -> None:
    with pytest.raises(SettingsError, match="^no_such_setting is not a setting$"):
        Settings(no_such_setting=1)  # type: ignore[call-arg]
