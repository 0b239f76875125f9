"""HTTP/1.1 on h11: a sans-IO protocol core and a thin anyio server around it."""
