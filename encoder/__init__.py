"""rheo encoder."""
