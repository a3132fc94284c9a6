"""The OpenAI audio API's routes, served by aiohttp (see __init__ for why aiohttp).

- POST /v1/audio/transcriptions: multipart `file` (any format daemon/audio.iter_audio_file
  reads), `model`, `language`, `prompt` (hotwords, split at spaces and commas, when the daemon's
  engine takes them; otherwise unused, as a prompt is only a hint), `response_format` json /
  text / verbose_json / srt / vtt, `stream=true` -> server-sent events transcript.text.delta
  and transcript.text.done. The file is decoded as it is fed, in blocks, off the event loop.
- POST /v1/audio/speech: JSON `input`, `voice` (ours: s2s, s2s-zh, s2s-en; OpenAI's names map
  to s2s), `speed`, `response_format` mp3 / opus / aac / flac / wav / pcm (24 kHz PCM16), sent
  chunked as the daemon synthesizes; `stream_format=sse` -> speech.audio.delta (base64 of the
  encoded audio) and speech.audio.done.
- GET /v1/models (and /v1/models/{id}), /v1/audio/models, /v1/audio/voices (Open WebUI lists these).

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}` with its status
codes: 400 bad input, 401 key, 404/405, 413 too large, 429 too many requests at once, 503
daemon busy or down (Retry-After), 504 timeout. An error after a streamed response started is
an `error` event for SSE; for audio the body is cut without its last chunk, so the client sees
an incomplete response rather than a short file that looks whole.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import re
from typing import Any, AsyncIterator, Collection, Dict, List, Optional, Tuple

from aiohttp import BodyPartReader, web

from bridge.auth import bearer, check_token
from bridge.daemon_link import TTS_TIMEOUT, DaemonLink
from bridge.openai_api.formats import AUDIO_FORMATS, TRANSCRIPT_FORMATS, Encoder, content_type, transcript_body
from bridge.speech import DEFAULT_VOICE, DaemonInfo, Transcription, find_voice
from daemon.wire import protocol as P
from daemon.wire.client_base import DaemonError
from daemon.config import Config
from daemon.errors import AudioError, ErrorCode

logger = logging.getLogger(__name__)

TRANSCRIBE_MODELS = ("s2s-asr", "whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
SPEECH_MODELS = ("s2s-tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's built-in voices: all are ours `s2s` (the daemon picks the language by the text).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
# A form field other than the file (model, language, prompt, ...), bytes.
MAX_FIELD_BYTES = 64 * 1024
# Multipart framing around the file: boundaries, part headers, the other fields.
FORM_OVERHEAD = 1 << 20
# Audio decoded and fed per step, seconds.
DECODE_BLOCK_SECONDS = 1.0
# The longest audio one transcription takes (OpenAI's own limit for its transcription models):
# a small compressed upload can decode to hours of speech recognition, so the decoded length is
# counted as it is fed and the request refused (bad_audio, 400) past it.
MAX_AUDIO_SECONDS = 1500
STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.BAD_AUDIO: 400, ErrorCode.BAD_TEXT: 400, ErrorCode.UNSUPPORTED: 400,
          ErrorCode.BAD_VERSION: 400, ErrorCode.UNKNOWN_TYPE: 400, ErrorCode.BUSY: 503, ErrorCode.UNAVAILABLE: 503,
          ErrorCode.SHUTTING_DOWN: 503, ErrorCode.TIMEOUT: 504}


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else None
        resp = web.json_response(self.body(), status=self.status, headers=headers)
        if self.status == 413:
            resp.force_close()  # the rest of the body is not read
        return resp

    @classmethod
    def from_daemon(cls, e: DaemonError) -> "ApiError":
        status = STATUS.get(e.code, 500)
        retry = e.retry_after if getattr(e, "retry_after", None) else (1.0 if status == 503 else None)
        param = {ErrorCode.BAD_TEXT: "input", ErrorCode.BAD_AUDIO: "file"}.get(e.code)
        return cls(status, e.message if status < 500 or status in (503, 504) else "speech daemon error: " + e.message,
                   param, e.code.value, retry)


def _one_of(value: Any, allowed: Collection[str], param: str, code: Optional[str] = None) -> None:
    """400 naming the parameter and what it may be, unless `value` is one of `allowed`."""
    if value not in allowed:
        raise _bad(f"{param} {str(value)[:40]!r} is not one of {', '.join(allowed)}", param, code)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


class Api:
    def __init__(self, cfg: Config, link: DaemonLink):
        self.cfg = cfg
        self.link = link
        self.info = DaemonInfo(link)
        self.active = 0
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        # Bodies read whole (the speech request's JSON): the longest text the daemon takes, escaped.
        app = web.Application(client_max_size=max(64 * 1024, self.cfg.limits.max_text_chars * 6 + 4096),
                              middlewares=[self.middleware])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/v1/audio/models", self.audio_models)
        app.router.add_get("/v1/audio/voices", self.audio_voices)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/speech", self.speech)
        return app

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            key = self.cfg.openai_api.api_key
            if key and not check_token(key, bearer(request.headers.get("Authorization"))):
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY; openai_api.api_key)",
                               code="invalid_api_key")
            if request.method != "POST":
                return await handler(request)
            if self.active >= self.cfg.openai_api.max_concurrent_requests:
                raise ApiError(429, f"{self.active} requests in progress (openai_api.max_concurrent_requests); "
                                    "retry shortly", code="too_many_requests", retry_after=1.0)
            self.active += 1
            try:
                return await handler(request)
            finally:
                self.active -= 1
        except ApiError as e:
            logger.info("%s %s -> %d %s", request.method, request.path, e.status, e.message)
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = {413: f"request body larger than {request.client_max_size} bytes (the daemon's "
                            f"limits.max_text_chars={self.cfg.limits.max_text_chars} characters, escaped)"}.get(
                e.status, f"{e.reason}: {request.method} {request.path}")
            return ApiError(e.status, message).response()
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            return ApiError(500, "internal error (see the s2s-openai log)").response()

    # --- models and voices --------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model(m) for m in TRANSCRIBE_MODELS + SPEECH_MODELS]})

    async def model(self, request: web.Request) -> web.Response:
        m = request.match_info["model"]
        if m not in TRANSCRIBE_MODELS + SPEECH_MODELS:
            raise ApiError(404, f"the model {m!r} does not exist", "model", "model_not_found")
        return web.json_response(self._model(m))

    @staticmethod
    def _model(m: str) -> Dict[str, Any]:
        return {"id": m, "object": "model", "created": 0, "owned_by": "s2s"}

    async def audio_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"id": m} for m in SPEECH_MODELS]})

    async def audio_voices(self, request: web.Request) -> web.Response:
        await self.info.refresh()
        return web.json_response({"voices": [{"id": v.name, "name": v.description} for v in self.info.voices()]})

    # --- transcriptions -----------------------------------------------------------------------

    async def _form(self, request: web.Request) -> Tuple[Dict[str, str], Optional[bytes]]:
        limit = self.cfg.openai_api.max_upload_bytes
        too_big = ApiError(413, f"the upload is larger than {limit} bytes (openai_api.max_upload_bytes)", "file",
                           "file_too_large")
        if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD:
            raise too_big
        if not request.content_type.startswith("multipart/"):
            raise _bad("send multipart/form-data with the audio in a `file` field", "file")
        fields: Dict[str, str] = {}
        data: Optional[bytes] = None
        try:
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise _bad("nested multipart bodies are not read")
                cap = limit if part.name == "file" else MAX_FIELD_BYTES
                buf = bytearray()
                while True:
                    chunk = await part.read_chunk(64 * 1024)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > cap:
                        if part.name == "file":
                            raise too_big
                        raise _bad(f"form field {str(part.name)[:40]!r} is longer than {MAX_FIELD_BYTES} bytes",
                                   part.name)
                if part.name == "file":
                    data = bytes(buf)
                elif part.name:
                    try:
                        fields[part.name] = buf.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _bad(f"form field {part.name[:40]!r} is not UTF-8 text", part.name) from None
        except (ConnectionError, asyncio.IncompleteReadError, web.HTTPException) as e:
            if isinstance(e, web.HTTPException) and e.status != 400:
                raise
            raise _bad("the upload ended before the end of its body (truncated)", "file") from None
        except ValueError as e:  # aiohttp's multipart parser: malformed framing or headers
            raise _bad(f"malformed multipart body: {e}"[:200]) from None
        except Exception as e:  # aiohttp.ClientPayloadError and kin: the body broke off
            if type(e).__module__.startswith("aiohttp"):
                raise _bad("the upload ended before the end of its body (truncated)", "file") from None
            raise
        return fields, data

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        fields, data = await self._form(request)
        if data is None:
            raise _bad("`file` is required (the audio to transcribe)", "file")
        model = fields.get("model")
        if model is not None:
            _one_of(model, TRANSCRIBE_MODELS, "model", "model_not_found")
        fmt = fields.get("response_format", "json")
        _one_of(fmt, TRANSCRIPT_FORMATS, "response_format")
        stream = fields.get("stream", "false").strip().lower()
        if stream not in ("true", "false"):
            raise _bad("stream must be true or false", "stream")
        language = fields.get("language") or None
        await self.info.refresh()
        prompt = fields.get("prompt", "")
        hotwords = [w for w in re.split(r"[\s,，、;；]+", prompt) if w] if prompt and self.info.hotwords else None

        from daemon.audio import iter_audio_file

        blocks = iter_audio_file(data, P.ASR_SAMPLE_RATE, DECODE_BLOCK_SECONDS)
        try:
            first = await asyncio.to_thread(next, blocks, None)  # not audio: 400 before the daemon is asked
        except AudioError as e:
            raise _bad(e.message, "file", e.code.value) from None
        rid = f"oa-{next(self._ids)}"
        if stream == "true":
            return await self._transcribe_sse(request, rid, language, hotwords, first, blocks)
        tr = Transcription(self.link, rid, language, hotwords)
        try:
            result = await self._transcribe(tr, first, blocks)
        except DaemonError as e:
            raise ApiError.from_daemon(e) from None
        body, ctype = transcript_body(result, fmt, language or self._asr_language())
        logger.info("%s: %.1f s of audio -> %d characters (%s)", rid, result.duration, len(result.text), fmt)
        return web.Response(text=body, content_type=ctype.split(";")[0], charset="utf-8")

    def _asr_language(self) -> Optional[str]:
        lang = self.cfg.asr.language
        return None if lang == "auto" else lang

    async def _transcribe(self, tr: Transcription, first: Optional[bytes], blocks: Any) -> Any:
        try:
            await tr.open()
            block, fed = first, 0
            while block is not None:
                fed += len(block)
                if fed > MAX_AUDIO_SECONDS * P.ASR_SAMPLE_RATE * 2:
                    raise DaemonError(f"the audio is longer than {MAX_AUDIO_SECONDS} s, the most one transcription "
                                      f"takes", ErrorCode.BAD_AUDIO)
                await tr.feed(block)
                block = await asyncio.to_thread(next, blocks, None)
            return await tr.finish()
        except BaseException:
            await tr.abort()
            raise
        finally:
            blocks.close()

    async def _transcribe_sse(self, request: web.Request, rid: str, language: Optional[str],
                              hotwords: Optional[List[str]], first: Optional[bytes], blocks: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        async def send(event: Dict[str, Any]) -> None:
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")

        async def delta(text: str) -> None:
            await send({"type": "transcript.text.delta", "delta": text})

        tr = Transcription(self.link, rid, language, hotwords, on_delta=delta)
        try:
            result = await self._transcribe(tr, first, blocks)
        except DaemonError as e:
            if not resp.prepared:  # nothing sent yet: a plain HTTP error
                raise ApiError.from_daemon(e) from None
            try:
                await send(ApiError.from_daemon(e).body())
                await resp.write_eof()
            except ConnectionError:
                pass
            return resp
        await send({"type": "transcript.text.done", "text": result.text})
        await resp.write_eof()
        return resp

    # --- speech -------------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> Dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _bad("the body must be JSON") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        text = body.get("input")
        if not isinstance(text, str):
            raise _bad("`input` (the text to speak) is required and must be a string", "input")
        model = body.get("model")
        if model is not None:
            _one_of(model, SPEECH_MODELS, "model", "model_not_found")
        fmt = body.get("response_format", "mp3")
        _one_of(fmt, AUDIO_FORMATS, "response_format")
        speed = body.get("speed")
        if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float))):
            raise _bad("speed must be a number", "speed")  # its range is the daemon's rule
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            raise _bad("stream_format must be audio or sse", "stream_format")
        voice_name = body.get("voice")
        if isinstance(voice_name, dict):
            voice_name = voice_name.get("id")
        if voice_name is not None and not isinstance(voice_name, str):
            raise _bad("voice must be a voice name", "voice")
        await self.info.refresh()
        known = self.info.voices()
        voice = find_voice(DEFAULT_VOICE if voice_name in OPENAI_VOICES else voice_name, known)
        if voice is None:
            raise _bad(f"voice {str(voice_name)[:40]!r} is not one of {', '.join(v.name for v in known)} "
                       f"(or OpenAI's {', '.join(OPENAI_VOICES)}, spoken as {DEFAULT_VOICE})", "voice", "voice_not_found")
        rid = f"oa-{next(self._ids)}"
        try:
            self.link.check("tts")
        except DaemonError as e:
            raise ApiError.from_daemon(e) from None
        chunks = self.link.tts.synthesize(text, language=voice.language, speed=float(speed) if speed is not None else None,
                                          request_id=rid, timeout=TTS_TIMEOUT, owner=rid)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except DaemonError as e:
            raise ApiError.from_daemon(e) from None
        return await self._send_speech(request, rid, chunks, first, fmt, stream_format == "sse", len(text))

    async def _send_speech(self, request: web.Request, rid: str, chunks: AsyncIterator[P.SynthAudio],
                           first: Optional[P.SynthAudio], fmt: str, sse: bool, chars: int) -> web.StreamResponse:
        rate = first.sample_rate if first is not None and first.sample_rate else self.cfg.tts.sample_rate
        encoder = Encoder(fmt, rate)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if sse else content_type(fmt)})
        await resp.prepare(request)

        async def out(data: bytes) -> None:
            if not data:
                return
            if sse:
                data = b"data: " + json.dumps({"type": "speech.audio.delta",
                                               "audio": base64.b64encode(data).decode()}).encode() + b"\n\n"
            await resp.write(data)

        async def rest() -> AsyncIterator[P.SynthAudio]:
            if first is not None:
                yield first
            async for c in chunks:
                yield c

        seconds = 0.0
        try:
            async for chunk in rest():
                if chunk.pcm:
                    seconds += len(chunk.pcm) / 2 / rate
                    await out(await asyncio.to_thread(encoder.encode, chunk.pcm))
            await out(await asyncio.to_thread(encoder.finish))
            if sse:
                await resp.write(b"data: " + json.dumps({"type": "speech.audio.done", "usage": {
                    "input_tokens": chars, "output_tokens": 0, "total_tokens": chars}}).encode() + b"\n\n")
            await resp.write_eof()
            logger.info("%s: %.1f s of %s speech", rid, seconds, fmt)
        except DaemonError as e:
            logger.warning("%s: synthesis failed after the response started: %s", rid, e.message)
            if sse:
                await resp.write(b"data: " + json.dumps(ApiError.from_daemon(e).body()).encode() + b"\n\n")
                await resp.write_eof()
            elif request.transport is not None:
                request.transport.abort()  # no last chunk: the client sees an incomplete body
        except ConnectionError:
            logger.info("%s: the client went away", rid)
        finally:
            encoder.close()
            await chunks.aclose()  # type: ignore[attr-defined]  # an unfinished request is cancelled in the daemon
        return resp
