"""The adapter to MLflow: where traces go, how they leave the process, and what is kept when they cannot.

Only `_mlflow.internals` touches MLflow's (and OpenTelemetry's) private names; everything else here uses
MLflow's public API or goes through it.
"""
