"""Graphs: the Graph object, its file format, pruning, influence and the viewer document."""
