"""HTTP layer: dependencies, routes and file responses."""
