"""Command-line tools that are not pipeline stages (``python -m tools.flow_diff``)."""
