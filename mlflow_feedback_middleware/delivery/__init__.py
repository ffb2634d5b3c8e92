"""Delivery: the durable outbox, the thread that writes votes to MLflow, and the record of traces issued here."""
