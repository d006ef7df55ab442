"""Test worlds: a fake clock, node builders and one world per kind, for the planners' table tests."""
