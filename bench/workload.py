"""What every system is asked to do: the models, the prompts, the token counts, the names.

Shared by the phases, the profiler and the report, so that a table row and the run that
produced it cannot disagree about what was measured.
"""

from __future__ import annotations

SMOL = "smollm2.gguf"  # file names in the run's models dir, which are also modeld's model ids
SMOL_B = "smollm2-b.gguf"  # a second copy of SmolLM2: the A/B switching pair
TINY = "tiny.gguf"
MODELS = (SMOL, TINY)  # the two models every system streams
MAX_TOKENS = 128  # per streamed request, as in the reference table
# The topic comes first and consecutive topics start with different words: a server that
# reuses the previous request's prompt prefix (llama_cpp.server does) gets no head start.
PROMPT = "{}: a detailed history, written for students.\n\n"
TOPICS = (  # one per repetition: the same prompt for every system, a new one each rep
    "Paris",
    "Ancient Rome",
    "The printing press",
    "Steam engines",
    "Violins",
    "Bicycles",
    "Kyoto",
    "Clocks",
    "Maps",
    "Glassmaking",
    "Windmills",
    "Chess",
    "Coffee",
    "Oslo",
    "Railways",
)  # each makes SmolLM2 write all 128 tokens greedily (checked), so every system does 128
WARM_PROMPT = PROMPT.format("Lighthouses")  # warm-up only: its output is not measured
INPROC_LOW = "in-process low-level"
INPROC_HIGH = "llama-cpp-python high-level"
LLAMA_SERVER = "llama-server"
LCP_SERVER = "llama_cpp.server"


def prompt_for(rep: int) -> str:
    """The prompt of repetition rep."""
    return PROMPT.format(TOPICS[rep % len(TOPICS)])
