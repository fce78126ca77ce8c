"""The experiment layer: params.yaml schema, outputs layout, fetching, reports, compare, MLflow.

Nothing in the engine (model, transcoders, attribution, graph, interventions) imports from here.
"""
