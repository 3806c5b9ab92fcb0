"""The host side: engine, scheduler, KV cache, balancers (built on model and sharding)."""
