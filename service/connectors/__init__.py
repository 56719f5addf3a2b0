"""Engine connectors: kvtier under a serving engine.

- ``hf_cache``: ``KVTierCache``, a Hugging Face transformers cache that loads the longest cached
  prefix of a prompt from kvtier (in-process ``TieredStore`` or the service through the SDK) and
  saves every full block as it completes;
- ``generate``: ``generate()``, one call that generates with any transformers causal LM through
  kvtier, with two hooks (``protocols``) for sparse decode and token eviction;
- ``refmodel``: the reference model (SmolLM2-135M-Instruct), loaded offline for ``kvtier demo``.

transformers is imported only by the modules that need it.
"""
