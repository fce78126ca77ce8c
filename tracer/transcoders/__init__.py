"""Transcoder sets: in-memory weights, on-disk layouts (local and hub)."""
