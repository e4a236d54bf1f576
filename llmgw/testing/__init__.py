"""Test and benchmark helpers that run real protocol endpoints: a deterministic mock OpenAI-compatible server
(`mock_openai`), a tiny random-weight GGUF model (`tiny_gguf`) and a launcher for llama-cpp-python's server
(`llamacpp`). Shipped in the package so `python -m llmgw bench openai` can use them too."""
