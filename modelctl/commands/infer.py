"""`modelctl infer`: send a prompt, stream the generated text (or the raw events) back.

The request waits (queue, model load) behind a spinner when a person watches; the text is
written as each token event arrives; Ctrl-C closes the connection, which cancels the
generation on the daemon, and the group turns it into exit code 130.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import click

from modelctl import render
from modelctl.client import ClientError, DaemonError, ProtocolError, Response
from modelctl.context import App, complete_model_id, pass_app
from modelctl.render import Environment, TextStream
from modelctl.schema import Outcome

MAX_RETRY_WAIT_S = 60.0  # cap on one Retry-After wait, so a wild hint cannot hang a script
DEFAULT_RETRY_WAIT_S = 1.0  # wait when a 429 carries no hint: the API's smallest Retry-After
STREAM_ACCEPT = "application/x-ndjson"  # ndjson events, not SSE


def read_prompt(prompt: str | None, env: Environment) -> str:
    """The prompt: the argument, or stdin for `-` or when stdin is not a terminal."""
    if prompt is not None and prompt != "-":
        return _utf8(prompt, "the PROMPT argument")
    if prompt is None and env.stdin_isatty:
        raise click.UsageError("give a PROMPT, or pipe one on stdin")
    try:
        text = env.stdin.read()
    except UnicodeDecodeError as exc:  # a strict decoder; others keep bad bytes (see _utf8)
        byte = exc.object[exc.start]
        message = f"the prompt read from stdin is not valid {exc.encoding} (byte 0x{byte:02x})"
        raise click.UsageError(message) from None
    if not text:
        raise click.UsageError("the prompt read from stdin is empty")
    return _utf8(text, "the prompt read from stdin")


def _utf8(text: str, what: str) -> str:
    """Refuse text that cannot travel as UTF-8: bytes that were not, which Python keeps as
    lone surrogates (U+DC80-U+DCFF) when it reads stdin or argv."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise click.UsageError(
            f"{what} is not valid UTF-8 ({byte} at character {exc.start + 1})"
        ) from None
    return text


def _non_empty(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> object:
    if any(value == "" for value in values):
        raise click.BadParameter("a stop string cannot be empty", ctx, param)
    return values


def build_body(prompt: str, model: str | None, stream: bool, **options: Any) -> dict[str, Any]:
    """The `/infer` request body, with only the options the user gave (the daemon's defaults
    stand for the rest)."""
    body: dict[str, Any] = {"prompt": prompt, "stream": stream}
    if model:
        body["model"] = model
    body.update({k: v for k, v in options.items() if v is not None and v != ()})
    if "stop" in body:
        body["stop"] = list(body["stop"])
    return body


def send_with_retry(env: Environment, send: Callable[[], Response], retries: int) -> Response:
    """Send; on a 429, wait its Retry-After and send again, up to `retries` more times."""
    attempt = 0
    while True:
        response = send()
        if response.status < 400:
            return response
        with response:
            error = DaemonError.from_response(response.status, response.headers, response.read())
        if error.status != 429 or attempt >= retries:
            raise error
        attempt += 1
        hint = error.retry_after_s
        delay = min(MAX_RETRY_WAIT_S, hint if hint is not None else DEFAULT_RETRY_WAIT_S)
        render.notice(
            env,
            f"daemon busy ({error.code}): retrying in {delay:g}s (retry {attempt} of {retries})",
        )
        env.sleep(delay)


def _parse_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"bad event line from the daemon: {line[:80]!r}") from exc
    if not isinstance(event, dict):
        raise ProtocolError(f"bad event line from the daemon: {line[:80]!r}")
    return event


def print_stream(env: Environment, response: Response, as_json: bool) -> Outcome:
    """Write the events (`--json`) or the text as it arrives; return the `done` event."""
    text = TextStream(env)
    outcome: Outcome | None = None
    try:
        for line in response.iter_lines():
            if as_json:
                render.write_data(env, line.decode("utf-8", "replace") + "\n")
            event = _parse_event(line)
            kind = event.get("type")
            if kind == "token" and not as_json:
                text.write(str(event.get("text") or ""))
            elif kind == "done":
                outcome = Outcome.from_json(event)
            elif kind == "error":
                raise DaemonError.from_object(event)
    except KeyboardInterrupt:
        render.interrupted(env, text)
        raise
    except ClientError:
        text.end_line()  # the error message goes on a line of its own
        raise
    if outcome is None:
        text.end_line()
        raise ProtocolError("the stream ended without a done event")
    if not as_json:
        text.finish()
    return outcome


def print_whole(env: Environment, raw: bytes, as_json: bool) -> Outcome:
    """Write a `stream: false` answer: the JSON as is, or its text."""
    body = raw.decode("utf-8", "replace")
    if as_json:
        render.write_data(env, body if body.endswith("\n") else body + "\n")
    document = _parse_event(raw)
    if not as_json:
        text = TextStream(env)
        text.write(str(document.get("text") or ""))
        text.finish()
    return Outcome.from_json(document)


@click.command()
@click.argument("prompt", required=False)
@click.option(
    "-m", "--model", shell_complete=complete_model_id, help="Model id (a .gguf file name)."
)
@click.option("--max-tokens", type=click.IntRange(min=1), help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling.")
@click.option("--top-k", type=click.IntRange(min=0), help="0 disables it.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for reproducible sampling.")
@click.option(
    "--stop", multiple=True, callback=_non_empty, help="Stop before this text (repeatable)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's ndjson events as is.")
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer.")
@click.option(
    "--retry",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="When busy (429), wait Retry-After and try again, this many times.",
)
@pass_app
def infer(
    app: App,
    prompt: str | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...],
    as_json: bool,
    no_stream: bool,
    retry: int,
) -> None:
    """Generate text from PROMPT (or from stdin with `-` or a pipe)."""
    env = app.env
    body = build_body(
        read_prompt(prompt, env),
        model,
        not no_stream,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
    )
    client = app.client(read_timeout=None)  # a queue wait or a model load may take long

    def send() -> Response:
        return client.request("POST", "/infer", json_body=body, headers=[("Accept", STREAM_ACCEPT)])

    decorate = env.interactive and not as_json
    spinner = render.waiting(env, model, whole=no_stream) if decorate else nullcontext()
    if no_stream:
        with spinner, send_with_retry(env, send, retry) as response:
            raw = response.read()
        outcome = print_whole(env, raw, as_json)
    else:
        with spinner:
            response = send_with_retry(env, send, retry)
        with response:
            outcome = print_stream(env, response, as_json)
    if decorate:
        render.stats(env, outcome)
