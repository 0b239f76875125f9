"""The per-model worker process (`python -m modeld.worker`): the only code that calls llama.cpp."""
