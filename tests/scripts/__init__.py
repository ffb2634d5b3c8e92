"""Scripts the tests run in fresh processes (MLflow's tracer, URI and OTel settings are process-wide)."""
