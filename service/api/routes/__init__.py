"""Versioned REST routes (``/v1``) and the unauthenticated health check."""
