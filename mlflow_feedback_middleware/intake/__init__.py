"""Feedback intake: the routes, what a vote may say (models, schema), and who may cast it (tokens, identity, limits)."""
