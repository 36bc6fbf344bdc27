"""Project-wide pytest configuration.

EROFS_TOOLS_CI=1 turns missing prerequisites (root, kernel features, tools) into
failures instead of skips: see tests/helpers.py require().
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
