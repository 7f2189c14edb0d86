"""A /predict request's images: read within limits, decoded as training decodes them.

Two bodies are taken: multipart/form-data with files in the field `files`, or JSON, an
array of base64 strings or {"images": [...]}. The body is read no further than the most
`max_images_per_request` images of `max_image_bytes` can take; a request that says it is
larger is refused before its body is read."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from visionops.core.config import ServingParams
from visionops.core.pipeline import UnreadableImage, decode_image

FIELD = "files"
PART_OVERHEAD = 4096  # a multipart part's headers, a JSON string's quotes and comma
EXPECTED = (f"send multipart/form-data with the images in the field '{FIELD}', or "
            "application/json: an array of base64 strings (or {\"images\": [...]})")


class BadInput(Exception):
    """A request refused: its HTTP status, a short reason (counted) and the message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Upload:
    name: str
    content: bytes


class _BodyTooLarge(Exception):
    pass


async def read_images(request: Request, limits: ServingParams) -> list[Upload]:
    """The request's images in order, or BadInput naming what is wrong."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        cap = limits.max_images_per_request * (limits.max_image_bytes + PART_OVERHEAD)
        read = _from_form
    elif kind == "application/json":
        cap = limits.max_images_per_request * (_base64_length(limits.max_image_bytes)
                                               + PART_OVERHEAD)
        read = _from_json
    else:
        raise BadInput(415, "unsupported_media_type",
                       f"Content-Type {kind or '(none)'} is not taken: {EXPECTED}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise _too_large_body(cap)
    try:
        uploads = await read(_capped(request, cap), limits)
    except _BodyTooLarge:
        raise _too_large_body(cap) from None
    except ClientDisconnect:
        raise BadInput(400, "client_disconnected", "the client went away") from None
    if not uploads:
        raise BadInput(422, "no_images", f"no images in the request: {EXPECTED}")
    for upload in uploads:
        if len(upload.content) > limits.max_image_bytes:
            raise _too_large_image(upload.name, len(upload.content), limits)
    return uploads


def decode_all(uploads: list[Upload], size: int, channels: int) -> np.ndarray:
    """uint8 pixels (N, size, size, channels): visionops.core.pipeline's decoding."""
    pixels = []
    for upload in uploads:
        buffer = io.BytesIO(upload.content)
        try:
            pixels.append(decode_image(buffer, size, channels))
        except UnreadableImage as exc:
            reason = str(exc).removeprefix(f"{buffer}: ")
            raise BadInput(400, "not_an_image", f"{upload.name}: {reason}") from None
        except Exception as exc:  # e.g. PIL's DecompressionBombError: this file's fault
            raise BadInput(400, "not_an_image", f"{upload.name}: not a readable image "
                                                f"({type(exc).__name__}: {exc})") from None
    return np.stack(pixels)


def _capped(request: Request, cap: int) -> Request:
    """The request, its body cut off with _BodyTooLarge past `cap` bytes."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise _BodyTooLarge
        return message

    return Request(request.scope, receive)


async def _from_form(request: Request, limits: ServingParams) -> list[Upload]:
    most = limits.max_images_per_request
    try:
        form = await request.form(max_files=most + 1, max_fields=most + 1)
    except HTTPException as exc:  # Starlette's parser refusing the form
        if "Too many files" in str(exc.detail):
            raise _too_many(limits) from None
        raise BadInput(400, "bad_form", f"not a readable multipart form: {exc.detail}"
                       ) from None
    try:
        sent = form.getlist(FIELD)
        if not sent:
            others = sorted({key for key, value in form.multi_items()
                             if isinstance(value, UploadFile)})
            found = f"files in field(s) {', '.join(others)}" if others else "no files"
            raise BadInput(422, "wrong_field", f"{found}: {EXPECTED}")
        if not all(isinstance(value, UploadFile) for value in sent):
            raise BadInput(422, "wrong_field", f"field '{FIELD}' holds text, not files: "
                                               f"{EXPECTED}")
        if len(sent) > most:
            raise _too_many(limits)
        uploads = []
        for index, file in enumerate(sent):
            name = file.filename or f"image-{index}"
            if file.size is not None and file.size > limits.max_image_bytes:
                raise _too_large_image(name, file.size, limits)
            uploads.append(Upload(name, await file.read()))
        return uploads
    finally:
        await form.close()


async def _from_json(request: Request, limits: ServingParams) -> list[Upload]:
    body = await request.body()
    return await run_in_threadpool(_parse_json, body, limits)  # megabytes: off the loop


def _parse_json(text: bytes, limits: ServingParams) -> list[Upload]:
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(400, "bad_json", f"the body is not JSON ({exc}): {EXPECTED}") from None
    images = body.get("images") if isinstance(body, dict) else body
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise BadInput(422, "bad_json", f"expected a list of base64 strings: {EXPECTED}")
    if len(images) > limits.max_images_per_request:
        raise _too_many(limits)
    return [_from_base64(f"image-{index}", text, limits) for index, text in enumerate(images)]


def _from_base64(name: str, text: str, limits: ServingParams) -> Upload:
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,...
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # line breaks of `base64` without -w0
    if len(text) > _base64_length(limits.max_image_bytes):
        raise _too_large_image(name, len(text) * 3 // 4, limits)
    try:
        return Upload(name, base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise BadInput(400, "bad_base64", f"{name}: not valid base64 ({exc})") from None


def _base64_length(size: int) -> int:
    return 4 * math.ceil(size / 3)


def _too_many(limits: ServingParams) -> BadInput:
    return BadInput(413, "too_many_images", f"more than {limits.max_images_per_request} "
                                            "images in one request (max_images_per_request)")


def _too_large_image(name: str, size: int, limits: ServingParams) -> BadInput:
    return BadInput(413, "image_too_large", f"{name}: {size} bytes, more than the "
                                            f"{limits.max_image_bytes} of max_image_bytes")


def _too_large_body(cap: int) -> BadInput:
    return BadInput(413, "body_too_large", f"the request body is larger than {cap} bytes, "
                                           "the most max_images_per_request images of "
                                           "max_image_bytes take")
