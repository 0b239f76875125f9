"""The only code in modeld that calls llama.cpp: load one model, run one generation at a time.

Uses llama-cpp-python's low-level ctypes bindings directly (the high-level `Llama` class
re-detokenizes the whole output every token). The hot loop is sample -> piece lookup ->
text stream -> decode one token, with every ctypes function bound to a local, token
pieces cached per id, and protocol writes batched by time.

Events leave through a `Sink` as plain dicts; `modeld.worker.main` owns the protocol fd.
Generated text leaves through an `Out` (`modeld.worker.output`): the same pipe, or the
client's own socket.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import llama_cpp.llama_cpp as llama

from modeld.worker import STREAM_INTERVAL_MS, llama_log
from modeld.worker.events import done_event, error_event
from modeld.worker.memory import accounted_mb, logged_ctx_bytes, rss_mb
from modeld.worker.output import ClientLost, Out, PipeOut
from modeld.worker.textstream import TextStream

__all__ = [
    "CancelFlag",
    "Engine",
    "GenerateSpec",
    "LoadError",
    "LoadSpec",
    "Sink",
]

STREAM_INTERVAL_S = STREAM_INTERVAL_MS / 1000.0  # see modeld.worker
PIECE_BUF_BYTES = 256  # longest token piece we expect; a longer one is retried with its size
WARMUP_TOKEN_FALLBACK = 0  # token decoded for warm-up when the model has no BOS
TOKEN_BYTES = ctypes.sizeof(llama.llama_token)  # stride of the token buffer
DECODE_ABORTED = 2  # llama_decode's code when the abort callback stopped it
KV_BYTES_PER_VALUE = 2  # default K/V cache type is f16
FLASH_ATTN = {  # the load op's flash_attn values, as llama.cpp's enum
    "auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# A GPU warm-up decodes this many tokens, so the first prompt's one-time allocations (cuBLAS
# workspace, memory pools: about 100 MB on an H200) are made before memory is measured.
GPU_WARMUP_TOKENS = 32


class Sink(Protocol):
    """Where protocol events go: all events of one call are written together."""

    def send(self, *events: dict[str, Any]) -> None: ...


class CancelFlag:
    """Set by the stdin reader thread, read by the decode loop (a plain attribute: cheap)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class LoadError(Exception):
    """A load failed; the message is safe to send (it never holds the file path)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """The `load` op: which file and how to size the context."""

    path: str
    n_ctx: int
    n_gpu_layers: int
    threads: int
    flash_attn: str
    n_batch: int
    stream_interval_s: float = STREAM_INTERVAL_S


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    """The `generate` op, validated."""

    id: int
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    messages: tuple[dict[str, str], ...] | None = None  # a chat: the prompt is rendered first


def _token_text(vocab: int, token: int) -> str:
    """A vocabulary entry's text ('' for a missing token)."""
    if token < 0:
        return ""
    raw = llama.llama_vocab_get_text(vocab, token)
    return raw.decode("utf-8", "replace") if raw else ""


class Engine:
    """A loaded model and its context; `generate` runs one request on the calling thread."""

    def __init__(self, model: int, ctx: int, spec: LoadSpec) -> None:
        self._model = model
        self._ctx = ctx
        self._vocab: int = llama.llama_model_get_vocab(model)
        self._mem: int = llama.llama_get_memory(ctx)
        self.n_ctx: int = llama.llama_n_ctx(ctx)
        self._n_batch = max(1, min(spec.n_batch, llama.llama_n_batch(ctx)))
        self._stream_interval_s = spec.stream_interval_s
        self._tokens = (llama.llama_token * (self.n_ctx + 1))()
        self._piece_buf = ctypes.create_string_buffer(PIECE_BUF_BYTES)
        self._pieces: dict[int, bytes | None] = {}  # token -> bytes, None for end-of-generation
        # Decode threads: the daemon lowers this while other models generate beside this
        # one (the reader thread sets it); generation picks it up before the next decode.
        self.threads = spec.threads
        self.want_threads = spec.threads
        self._cancel = CancelFlag()
        # Asked between two graph nodes of a prompt decode: stop it when the request is
        # cancelled, or when the daemon has lowered this worker's share of the cores (it
        # is redone with fewer threads: see _process_prompt).
        # Not for recurrent or hybrid models: their state cannot lose a part of a sequence.
        self._redo = not (
            llama.llama_model_is_recurrent(model) or llama.llama_model_is_hybrid(model)
        )
        self._abort_cb = llama.ggml_abort_callback(
            lambda _data: (
                self._cancel.cancelled or (self._redo and self.want_threads < self.threads)
            )
        )
        self._no_abort = llama.ggml_abort_callback()  # a NULL callback

    # ---- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, spec: LoadSpec) -> tuple[Engine, dict[str, Any]]:
        """Load the model, create the context, warm up; return the engine and `loaded` fields."""
        if not os.path.isfile(spec.path):
            raise LoadError("model file not found")
        t0 = time.perf_counter()
        base_mb = rss_mb()  # the process before the model: interpreter, llama.cpp's code
        mparams = llama.llama_model_default_params()
        mparams.n_gpu_layers = spec.n_gpu_layers
        model = llama.llama_model_load_from_file(spec.path.encode(), mparams)
        if not model:
            raise LoadError("llama.cpp could not load the model (unsupported or corrupt GGUF)")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = spec.n_ctx
        cparams.n_batch = spec.n_batch
        cparams.n_ubatch = min(spec.n_batch, cparams.n_ubatch)
        cparams.n_threads = spec.threads
        cparams.n_threads_batch = spec.threads
        cparams.flash_attn_type = FLASH_ATTN[spec.flash_attn]
        cparams.no_perf = True
        with llama_log.captured() as captured:  # the context's buffer sizes are logged
            ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            llama.llama_model_free(model)
            raise LoadError("llama.cpp could not create a context (out of memory?)")
        engine = cls(model, ctx, spec)
        load_ms = (time.perf_counter() - t0) * 1000.0
        on_gpu = spec.n_gpu_layers != 0 and llama.llama_supports_gpu_offload()
        warmup_ms = engine._warm_up(GPU_WARMUP_TOKENS if on_gpu else 1)
        info = engine._describe(captured)
        rss_after_mb = rss_mb()
        info.update(
            load_ms=load_ms,
            warmup_ms=warmup_ms,
            rss_mb=rss_after_mb,
            mem_mb=accounted_mb(base_mb, rss_after_mb, info["model_bytes"], info["ctx_bytes"]),
            threads=spec.threads,
        )
        return engine, info

    def _warm_up(self, n_tokens: int) -> float:
        """Decode n_tokens and sample one so first-request costs are paid now; return ms."""
        t0 = time.perf_counter()
        bos = llama.llama_vocab_bos(self._vocab)
        n = max(1, min(n_tokens, self._n_batch, self.n_ctx))
        for i in range(n):
            self._tokens[i] = bos if bos >= 0 else WARMUP_TOKEN_FALLBACK
        smpl = llama.llama_sampler_init_greedy()
        try:
            if llama.llama_decode(self._ctx, llama.llama_batch_get_one(self._tokens, n)) == 0:
                llama.llama_sampler_sample(smpl, self._ctx, -1)
        finally:
            llama.llama_sampler_free(smpl)
            llama.llama_memory_clear(self._mem, False)
        return (time.perf_counter() - t0) * 1000.0

    def _describe(self, ctx_log: list[bytes]) -> dict[str, Any]:
        """The model facts the daemon wants in `loaded` (sizes, template, special tokens)."""
        template = llama.llama_model_chat_template(self._model, None)
        return {
            "n_ctx": self.n_ctx,
            "n_ctx_train": llama.llama_model_n_ctx_train(self._model),
            "n_vocab": llama.llama_vocab_n_tokens(self._vocab),
            "model_bytes": llama.llama_model_size(self._model),
            "ctx_bytes": self._ctx_bytes(ctx_log),
            "chat_template": template.decode("utf-8", "replace") if template else None,
            "bos": _token_text(self._vocab, llama.llama_vocab_bos(self._vocab)),
            "eos": _token_text(self._vocab, llama.llama_vocab_eos(self._vocab)),
        }

    def _ctx_bytes(self, ctx_log: list[bytes]) -> int:
        """Context memory: the KV/compute/output buffers llama.cpp reported, else the KV size."""
        logged = logged_ctx_bytes(ctx_log)
        if logged > 0:
            return logged
        m = self._model
        n_head = max(1, llama.llama_model_n_head(m))
        head_dim = llama.llama_model_n_embd(m) // n_head
        kv_width = 2 * head_dim * llama.llama_model_n_head_kv(m)  # K and V per layer
        return int(self.n_ctx * llama.llama_model_n_layer(m) * kv_width * KV_BYTES_PER_VALUE)

    def follow_threads(self) -> None:
        """Use the thread count the daemon asked for, if it changed (cheap to call often)."""
        n = self.want_threads
        if n != self.threads:
            llama.llama_set_n_threads(self._ctx, n, n)
            self.threads = n

    def close(self) -> None:
        """Free the context and the model."""
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = 0
        if self._model:
            llama.llama_model_free(self._model)
            self._model = 0

    # ---- generation ----------------------------------------------------------------

    def tokenize(self, prompt: str) -> int:
        """Tokenize into the token buffer; return the count (may exceed the buffer)."""
        raw = prompt.encode("utf-8")
        cap = len(self._tokens)
        n: int = llama.llama_tokenize(self._vocab, raw, len(raw), self._tokens, cap, True, True)
        if n < 0:
            return -n  # too long for the context: only the count matters
        if n == 0:
            bos = llama.llama_vocab_bos(self._vocab)
            if bos >= 0:
                self._tokens[0] = bos
                return 1
        return n

    def _sampler(self, spec: GenerateSpec) -> int:
        """A C sampler chain for this request (greedy at temperature 0)."""
        chain: int = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = llama.llama_sampler_chain_add
        if spec.temperature <= 0.0:
            add(chain, llama.llama_sampler_init_greedy())
            return chain
        if spec.top_k > 0:
            add(chain, llama.llama_sampler_init_top_k(spec.top_k))
        if spec.top_p < 1.0:
            add(chain, llama.llama_sampler_init_top_p(spec.top_p, 1))
        add(chain, llama.llama_sampler_init_temp(spec.temperature))
        if spec.seed is None:
            seed = random.getrandbits(32)
        else:  # llama.cpp takes its "random" seed for a chosen one: give it its neighbour
            seed = spec.seed & 0xFFFFFFFF
            seed = seed - 1 if seed == llama.LLAMA_DEFAULT_SEED else seed
        add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def generate(
        self, spec: GenerateSpec, cancel: CancelFlag, sink: Sink, out: Out | None = None
    ) -> None:
        """Run one request to its end: `start` and exactly one done or error to the sink,
        the text to `out` (by default, `tokens` events to the sink)."""
        t_req = time.perf_counter()
        n_prompt = self.tokenize(spec.prompt)
        rid = spec.id
        if n_prompt == 0:
            sink.send(error_event(rid, "invalid_request", "the prompt has no tokens"))
            return
        if n_prompt >= self.n_ctx:
            msg = f"prompt is {n_prompt} tokens, the context holds {self.n_ctx}"
            sink.send(error_event(rid, "prompt_too_long", msg))
            return
        if cancel.cancelled and out is not None:  # handed off, and stopped first: no head,
            # no `start`, so the daemon may still answer with a status of its own
            sink.send(error_event(rid, "cancelled", "the generation was stopped before it began"))
            return
        out = out if out is not None else PipeOut(sink.send, rid)
        out.begin()  # a handed-off response's head: before `start`, which says it went
        sink.send({"ev": "start", "id": rid, "prompt_tokens": n_prompt})
        if out.lost is not None:  # the client cannot be written to: no need to decode
            out.finish([], done_event(rid, "cancelled", n_prompt, 0, 0.0, 0.0))
            return
        self._cancel = cancel
        self.follow_threads()
        smpl = self._sampler(spec)
        try:
            rc = self._process_prompt(n_prompt, cancel)
            if cancel.cancelled:  # between chunks, or inside one (llama_decode returned 2)
                out.finish([], done_event(rid, "cancelled", n_prompt, 0, 0.0, 0.0))
                return
            if rc != 0:
                failed = error_event(rid, "generation_failed", f"llama_decode returned {rc}")
                out.finish([], failed)
                return
            limit = min(spec.max_tokens, self.n_ctx - n_prompt)
            self._decode_loop(spec, smpl, limit, n_prompt, t_req, cancel, out)
        finally:
            llama.llama_sampler_free(smpl)
            llama.llama_memory_clear(self._mem, False)

    def _process_prompt(self, n_prompt: int, cancel: CancelFlag) -> int:
        """Decode the prompt in n_batch chunks, abortable; return llama_decode's last code.

        A decode under way when the daemon lowers this worker's threads (another model
        started generating) is stopped and goes on with the new count: finishing it with
        the old one would run more threads than cores, and llama.cpp's threads spin at
        every graph step waiting for a peer that is not running, which can turn a prompt
        of milliseconds into seconds for both models. llama.cpp keeps the micro-batches a
        stopped decode finished and drops the one under way; the next decode starts after
        what the KV cache holds.
        """
        ctx, step, mem = self._ctx, self._n_batch, self._mem
        tokens = self._tokens
        llama.llama_set_abort_callback(ctx, self._abort_cb, None)
        try:
            start = 0
            while start < n_prompt:
                if cancel.cancelled:
                    return 0
                self.follow_threads()
                n = min(step, n_prompt - start)
                chunk = (llama.llama_token * n).from_buffer(tokens, start * TOKEN_BYTES)
                with llama_log.held() as errors:
                    rc: int = llama.llama_decode(ctx, llama.llama_batch_get_one(chunk, n))
                    stopped = rc == DECODE_ABORTED and not cancel.cancelled  # for fewer threads
                    if stopped:
                        errors.drop()
                if stopped:
                    start = llama.llama_memory_seq_pos_max(mem, 0) + 1
                    continue
                if rc != 0:
                    return rc
                start += n
            return 0
        finally:
            llama.llama_set_abort_callback(ctx, self._no_abort, None)

    def _decode_loop(
        self,
        spec: GenerateSpec,
        smpl: int,
        limit: int,
        n_prompt: int,
        t_req: float,
        cancel: CancelFlag,
        out: Out,
    ) -> None:
        """Sample, stream and decode token by token until stop, length, cancel or error."""
        ctx, rid = self._ctx, spec.id
        sample, decode = llama.llama_sampler_sample, llama.llama_decode
        pieces, clock, interval = self._pieces, time.perf_counter, self._stream_interval_s
        stream = TextStream(spec.stop)
        push = stream.push
        one = (llama.llama_token * 1)()
        batch = llama.llama_batch_get_one(one, 1)  # points at `one`: reused every step
        pending: list[str] = []
        n_gen = rc = 0
        t_first = last_flush = first_at = 0.0
        reason = "length"
        while n_gen < limit:
            tok: int = sample(smpl, ctx, -1)
            try:
                piece = pieces[tok]
            except KeyError:
                piece = self._piece(tok)
            if not n_gen:
                t_first, first_at = clock(), time.monotonic()
            if piece is None:
                reason = "stop"
                break
            n_gen += 1
            text = push(piece)
            if text:
                pending.append(text)
            if pending:  # checked at every token: held text never waits on a later one
                now = clock()
                if now - last_flush >= interval:  # the first text goes out at once
                    last_flush = now
                    try:
                        out.write(pending)
                    except ClientLost:
                        reason = "cancelled"
                        break
                    pending = []
            if stream.stopped:
                reason = "stop"
                break
            if cancel.cancelled:
                reason = "cancelled"
                break
            if n_gen >= limit:
                break
            if self.want_threads != self.threads:
                self.follow_threads()
            one[0] = tok
            rc = decode(ctx, batch)
            if rc != 0:
                break
        t_end = clock()
        if rc != 0:
            failed = error_event(rid, "generation_failed", f"llama_decode returned {rc}")
            out.finish(pending, failed)
            return
        if reason != "cancelled":
            tail = stream.finish()
            if tail:
                pending.append(tail)
        t_first = t_first or t_end
        ttft_ms = (t_first - t_req) * 1000.0
        gen_ms = (t_end - t_first) * 1000.0
        done = done_event(rid, reason, n_prompt, n_gen, ttft_ms, gen_ms)
        done["threads"] = self.threads  # what the last decode ran with
        if first_at:
            done["first_at"] = first_at  # monotonic, as the daemon's clock: its TTFT
        out.finish(pending, done)

    def _piece(self, tok: int) -> bytes | None:
        """A token's bytes (None for end-of-generation), from llama.cpp, cached per token."""
        piece: bytes | None
        if llama.llama_vocab_is_eog(self._vocab, tok):
            piece = None
        else:
            buf = self._piece_buf
            n = llama.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            piece = buf.raw[: max(n, 0)]
        self._pieces[tok] = piece
        return piece
