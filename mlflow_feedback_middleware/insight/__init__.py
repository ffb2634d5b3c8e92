"""Insight, offline: feedback reports (text, JSON, HTML), evaluation datasets and the ``mlflow-feedback`` CLI."""
