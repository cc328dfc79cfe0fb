"""The method itself, in plain torch: the adapter, memory layers, the cache, the patch callables, the artist
controls, guidance, and the one injection builder."""
