"""Thin Typer stage commands: read params, call the library, write outputs, log to MLflow."""
