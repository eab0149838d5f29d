"""Event sources: each module turns one kernel interface into typed events.

Nothing here knows about detection or about the agent that wires it.
"""
