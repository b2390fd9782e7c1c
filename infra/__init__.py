"""Deployment files and the tools that render them (``python -m infra.render``)."""
