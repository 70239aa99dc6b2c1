"""vLLM integration (serving side): a ``vllm.general_plugins`` plugin that captures the residual
stream inside vLLM's worker processes and sends it through the same ring, relay and link as the
``transformers`` capture client."""
