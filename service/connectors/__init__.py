"""Engine connectors: how an inference engine (Hugging Face transformers, vLLM) uses kvtier."""
