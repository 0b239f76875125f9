"""The per-model worker process (`python -m modeld.worker`): the only code that calls llama.cpp."""

# Tokens made within this long of the last write wait to go out with the next one (the
# first goes at once). Each write wakes the daemon and the client; on a machine whose
# cores all decode, that CPU comes out of decoding. 20 ms beat 10 ms in three paired runs
# (SmolLM2 +0.7 to +7 %, the tiny model +9 to +20 % end to end; docs/performance.md) and
# is still below what a reader can see; a token waits at most the interval plus the time
# to make one more. The default of --stream-interval-ms.
STREAM_INTERVAL_MS = 20
