"""The intervention modes: the one list, importable without torch (the CLI offers them in --help).

- direct: attention, norms and MLP outputs frozen to the prompt's values: the adjacency's own
  model, so ablating a source changes each target by exactly its edge;
- frozen_attention: attention patterns frozen; norms, MLPs and transcoders recomputed;
- full: everything downstream recomputed.
"""

MODES = ("direct", "frozen_attention", "full")
