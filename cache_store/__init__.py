"""The cache store role: registry of live workers (and, later, the block-hash index). Soft state only."""
