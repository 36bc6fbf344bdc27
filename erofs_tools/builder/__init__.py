"""Image builders: tree sources, mkfs writer, RAFS pack (chunker, compressor, blob writer, chunk dict)."""
