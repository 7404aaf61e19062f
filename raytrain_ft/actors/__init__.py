"""Ray actors: thin wrappers around the pure modules."""
