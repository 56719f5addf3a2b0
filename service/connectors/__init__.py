"""Engine connectors: kvtier under a serving engine.

- ``hf_cache``: ``KVTierCache``, a Hugging Face transformers cache that loads the longest cached
  prefix of a prompt from kvtier and saves every full block as it completes;
- ``backends``: where its blocks live: ``StoreBackend`` (a ``TieredStore`` in this process) and
  ``ServiceBackend`` (a running service through the REST SDK), behind the ``KVBackend`` protocol;
- ``generate``: ``generate()``, one call that generates with any transformers causal LM through
  kvtier, with the two hooks of ``protocols`` (``AttentionHook`` for sparse decode,
  ``TokenPolicy`` for token eviction);
- ``refmodel``: the reference model (SmolLM2-135M-Instruct), loaded offline;
- ``demo``: ``kvtier demo``, a multi-turn session over one long document on the reference model;
- ``vllm``: ``KVTierConnector``, a vLLM v1 KV-connector adapter (not yet run inside vLLM).

transformers and vLLM are imported only by the modules that need them (not by this package).
"""
