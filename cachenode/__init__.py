"""cachenode: a node-local tiered read-through cache for Glance image downloads."""

__version__ = "0.1.0"
