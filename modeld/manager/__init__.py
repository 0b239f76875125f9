"""Instance lifecycle: what is loaded, what waits, what gets evicted."""
