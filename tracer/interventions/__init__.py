"""Interventions on feature activations, and validating a graph against them."""
