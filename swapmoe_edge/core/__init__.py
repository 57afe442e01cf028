"""Shared words: keys, units, errors, progress. Imports nothing of ours."""
