"""Engine connectors: kvtier under a serving engine.

- ``hf_cache``: ``KVTierCache``, a Hugging Face transformers cache that loads the longest cached
  prefix of a prompt from kvtier and saves every full block as it completes;
- ``backends``: where its blocks live: ``StoreBackend`` (a ``TieredStore`` in this process) and
  ``ServiceBackend`` (a running service through the SDK: REST, or shared memory when the service is
  local, ``service_client``), behind the ``KVBackend`` protocol;
- ``generate``: ``generate()``, one call that generates with any transformers causal LM through
  kvtier, with the two hooks of ``protocols`` (``AttentionHook`` for sparse decode,
  ``TokenPolicyRuntime`` for token eviction);
- ``hf_attention``: ``SparseDecode`` (an ``AttentionHook``: decode attention over the tokens a
  selector picks, through ``sparse_attn.sparse_decode``); ``hf_tokens``: ``TokenPolicy`` (a
  ``TokenPolicyRuntime``: generation under a fast-tier token budget, ``drop`` or ``demote``);
  ``hf_shared_prefix``: ``shared_prefix_generate`` (Hydragen batches); ``hf_dispatch``: the
  registered transformers attention functions;
- ``refmodel``: the reference model (SmolLM2-135M-Instruct), loaded offline;
- ``demo``: ``kvtier demo``, a multi-turn session over one long document on the reference model;
- ``vllm``: ``KVTierConnector``, a vLLM v1 KV connector (tested inside real vLLM); ``vllm_layout``: vLLM's
  paged KV layouts per attention backend and the gathers/scatters between them and kvtier blocks.

transformers and vLLM are imported only by the modules that need them (not by this package).
"""
