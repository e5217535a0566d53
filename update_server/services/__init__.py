"""Service layer: one function per use case; each owns its transaction and raises domain errors."""
