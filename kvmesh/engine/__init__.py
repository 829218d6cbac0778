"""The engine: a model over a paged KV pool, driven by one scheduler. It knows nothing of gRPC.

NOTE: this package's __init__ imports nothing: the cache store imports `kvmesh.engine.block_hash` and
must not pay for (or depend on) torch.
"""
