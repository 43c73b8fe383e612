"""rheo decoder."""
