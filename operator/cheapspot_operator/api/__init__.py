"""The custom resources' API: pydantic models of both kinds, their shared types, CRD generation."""
