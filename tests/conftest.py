"""Shared pytest configuration: plugins used across the suite."""

pytest_plugins = ["tests.fhir_servers"]
