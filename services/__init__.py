"""rheo services."""
