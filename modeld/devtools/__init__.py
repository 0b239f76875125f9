"""Developer tools: tiny and malformed GGUF files for tests, and the demo model fetcher."""
