"""The pipeline's steps: plain functions tests call directly, each wrapped as a Prefect task."""
