"""Attribution: the algorithm (attribute), its backward rows, and estimates before a run."""
