"""MiniChat's shared core: domain, configuration, data access, auth, providers, events."""

__version__ = "0.1.0"
