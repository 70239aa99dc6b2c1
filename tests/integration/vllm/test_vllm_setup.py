"""What happens before any token: naming from the OpenAI server's `vllm_xargs`, and the
settings the plugin refuses at start (speculative decoding, a layer the model lacks)."""

from __future__ import annotations

import pytest

from monitor.capture.vllm.batch import tag_request
from tests.integration.vllm.harness import Engine, engine_kwargs, monitor_env, write_model

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


def test_openai_vllm_xargs_name_the_conversation():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    request = CompletionRequest(
        model="tiny",
        prompt=[1, 2, 3],
        vllm_xargs={
            "sm_conversation_id": "support-42",
            "sm_prompt_role": "system",
            "sm_role": "user",
            "sm_attributes": '{"tenant": "acme"}',
        },
    )
    extra = request.to_sampling_params(16).extra_args
    tag = tag_request("cmpl-1-0a1b2c3d", extra)
    assert (tag.conversation_id, tag.prompt_role, tag.role, dict(tag.attributes)) == (
        "support-42",
        "system",
        "user",
        {"tenant": "acme"},
    )


def start_failure(tmp_path, env, **overrides) -> str:
    kwargs = engine_kwargs(write_model(tmp_path / "tiny-llama"), eager=True, **overrides)
    with pytest.raises(RuntimeError, match="engine exited"):
        Engine(kwargs, env, tmp_path / "engine.log").stop()
    out = tmp_path / "engine.out"
    return (out.read_text() if out.exists() else "") + (tmp_path / "engine.log").read_text()


def test_speculative_decoding_is_refused_at_start(tmp_path):
    speculative = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    log = start_failure(tmp_path, monitor_env("127.0.0.1:1"), speculative_config=speculative)
    assert "speculative decoding is not supported" in log
    assert "method='ngram'" in log


def test_a_layer_the_model_lacks_is_refused_at_start(tmp_path):
    log = start_failure(tmp_path, monitor_env("127.0.0.1:1", layers="7"))
    assert "layer 7 out of range; the model has 2 decoder layers" in log
