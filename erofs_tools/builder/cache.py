"""Blob cache files: moved to the reader layer (erofs_tools.reader.cache), which mount
and convert use without the builder; re-exported here for the builder's callers."""
from erofs_tools.reader.cache import cache_path, expand_blob, find_blob, is_complete

__all__ = ["cache_path", "expand_blob", "find_blob", "is_complete"]
