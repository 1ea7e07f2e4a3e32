"""The one home of specops's version (setup reads it from here without importing specops)."""
__version__ = "0.2.0"
