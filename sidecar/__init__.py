"""The agent: config, capability probe, ECS identity, and the loop wiring collectors to outputs."""

__version__ = "0.1.0"
