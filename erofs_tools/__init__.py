"""erofs-tools: EROFS and Nydus RAFS v6 image builder, reader and registry tools."""

__version__ = "0.1.0"
