"""Prefect flows around the DVC pipeline, and the `admm-prune` CLI.

DVC decides what runs (skip / restore from the run-cache / run); the flows run each
stage through DVC, log what happened, retry failures, schedule and sweep. No
algorithm code lives here.
"""
