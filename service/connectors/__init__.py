"""Engine connectors: adapters that let serving engines load and save KV blocks through kvtier."""
