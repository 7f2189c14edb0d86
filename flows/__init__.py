"""Prefect flows that chain the steps in `tasks`."""
