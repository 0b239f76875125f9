"""The HTTP API: routes, request validation and the endpoints' handlers."""
