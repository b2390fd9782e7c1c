"""moeops library code: importable and testable without a Ray cluster."""

__version__ = "0.1.0"
