"""Kernel front ends: they turn kernel read requests into fill(key, offset, length) calls.

They know nothing about blobs or chunks; the daemon core supplies the callback.
"""
