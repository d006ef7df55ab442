"""Package data (gobuild); a package so the `*` package-data patterns ship it in wheels."""
