"""The relay linger's settings: the vLLM plugin's config (file, environment override, the guard
rule that a blocking guard never lingers, validation) and CaptureClient's own check, which
runs before any relay is started. The relay's wire config carries the client's queue_size
(the linger ends before half of it waits)."""

from __future__ import annotations

import math

import pytest

from monitor.capture import CaptureClient
from monitor.capture.channel.protocol import RelayConfig, SenderSettings
from monitor.capture.vllm.config import PluginConfigError, load_settings
from monitor.limits import MAX_LINGER_MS


def _env(tmp_path, text: str, **extra: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    config = tmp_path / "monitor.yaml"
    config.write_text("target: 127.0.0.1:1\nlayers: [1]\n" + text)
    return {"SAFETY_MONITOR_CONFIG": str(config), **extra}


def test_default_is_no_linger(tmp_path):
    settings = load_settings(_env(tmp_path, ""))
    assert settings.linger_ms == 0.0 and settings.client_kwargs()["linger_ms"] == 0.0


def test_linger_from_the_file_and_the_environment_override(tmp_path):
    assert load_settings(_env(tmp_path, "linger_ms: 5\n")).client_kwargs()["linger_ms"] == 5.0
    env = _env(tmp_path, "linger_ms: 5\n", SAFETY_MONITOR_LINGER_MS="20")
    assert load_settings(env).client_kwargs()["linger_ms"] == 20.0


def test_a_guard_that_blocks_never_lingers(tmp_path):
    """With block_within the guard waits for each step's verdict: a linger would hold back the
    very steps waited for, so the client gets 0 whatever the setting."""
    env = _env(tmp_path, "", SAFETY_MONITOR_LINGER_MS="20", SAFETY_MONITOR_BLOCK_WITHIN="2")
    settings = load_settings(env)
    assert settings.linger_ms == 20.0 and settings.block_within == 2
    assert settings.client_kwargs()["linger_ms"] == 0.0
    # Without block_within, or with the guard off (alerts only), the linger stays.
    del env["SAFETY_MONITOR_BLOCK_WITHIN"]
    assert load_settings(env).client_kwargs()["linger_ms"] == 20.0
    unguarded = _env(tmp_path, "guard: false\nblock_within: 2\nlinger_ms: 20\n")
    assert load_settings(unguarded).client_kwargs()["linger_ms"] == 20.0


@pytest.mark.parametrize("value", ["-1", "1001", "nan", "inf", "x"])
def test_plugin_rejects_a_bad_linger_from_the_environment(tmp_path, value):
    with pytest.raises(PluginConfigError, match="linger_ms"):
        load_settings(_env(tmp_path, "", SAFETY_MONITOR_LINGER_MS=value))


@pytest.mark.parametrize("value", ["true", "-0.5", "1000.5", ".nan", "[1]"])
def test_plugin_rejects_a_bad_linger_in_the_file(tmp_path, value):
    with pytest.raises(PluginConfigError, match="linger_ms"):
        load_settings(_env(tmp_path, f"linger_ms: {value}\n"))


def test_plugin_accepts_the_bounds(tmp_path):
    assert load_settings(_env(tmp_path, "linger_ms: 0\n")).linger_ms == 0.0
    top = load_settings(_env(tmp_path, f"linger_ms: {MAX_LINGER_MS:g}\n"))
    assert top.linger_ms == MAX_LINGER_MS


@pytest.mark.parametrize("value", [-1.0, MAX_LINGER_MS + 1, math.nan, math.inf, True])
def test_capture_client_rejects_a_bad_linger(value):
    with pytest.raises(ValueError, match="linger_ms"):
        CaptureClient("127.0.0.1:1", metrics_registry=None, linger_ms=value)


def test_relay_config_carries_linger_and_queue_size():
    settings = SenderSettings(
        target="127.0.0.1:1",
        model_name="m",
        max_message_bytes=1 << 20,
        reconnect_backoff=(0.1, 1.0),
        connect_timeout=1.0,
        fail_closed=False,
        linger_ms=20.0,
        queue_size=16,
    )
    back = RelayConfig.from_json(RelayConfig(settings, 3, 4096).to_json()).settings
    assert (back.linger_ms, back.queue_size) == (20.0, 16)
