"""A /predict request's images: read within limits, checked from their headers, decoded
as training decodes them.

Two bodies are taken: multipart/form-data with files in the field `files`, or JSON, an
array of base64 strings or {"images": [...]}. A body is read no further than
`max_request_bytes` (or what `max_images_per_request` images of `max_image_bytes` take, if
less), within `read_timeout_seconds`, and only while the process-wide budget of bytes in
flight (budget.py) covers it; a request that says it is larger is refused before its body
is read. Before any pixel is decoded, each image's header must name an allowed format
(`validation.allowed_formats`) and sides within `validation.min_side`..`max_side`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from visionops.core.config import ServingParams, ValidationParams
from visionops.core.pipeline import UnreadableImage, decode_image
from visionops.serving.budget import OverBudget, Reservation

FIELD = "files"
PART_OVERHEAD = 4096  # a multipart part's headers, a JSON string's quotes and comma
EXPECTED = (f"send multipart/form-data with the images in the field '{FIELD}', or "
            "application/json: an array of base64 strings (or {\"images\": [...]})")
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_WARNINGS = threading.Lock()  # warnings' filters are process-wide: one check changes them


def image_format(content: bytes) -> str | None:
    """PNG or JPEG, as the file's signature claims, else None."""
    return next((name for magic, name in SIGNATURES if content.startswith(magic)), None)


class BadInput(Exception):
    """A request refused: its HTTP status, a short reason (counted) and the message."""

    def __init__(self, status: int, reason: str, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Upload:
    name: str
    content: bytes


class _BodyTooLarge(Exception):
    pass


async def read_images(request: Request, limits: ServingParams, held: Reservation
                      ) -> list[Upload]:
    """The request's images in order, or BadInput naming what is wrong. `held` is given
    the body's bytes as they are known, before they are read."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        cap, what = _body_cap(limits.max_image_bytes, limits)
        read = _from_form
    elif kind == "application/json":
        cap, what = _body_cap(_base64_length(limits.max_image_bytes), limits)
        read = _from_json
    else:
        raise BadInput(415, "unsupported_media_type",
                       f"Content-Type {kind or '(none)'} is not taken: {EXPECTED}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise _too_large_body(cap, what)
    try:
        held.cover(int(declared) if declared.isdigit() else 0)
        uploads = await read(_capped(request, cap, held), limits)
    except OverBudget as exc:
        raise BadInput(503, "overloaded", str(exc), retry_after="1") from None
    except _BodyTooLarge:
        raise _too_large_body(cap, what) from None
    except ClientDisconnect:
        raise BadInput(400, "client_disconnected", "the client went away") from None
    if not uploads:
        raise BadInput(422, "no_images", f"no images in the request: {EXPECTED}")
    for upload in uploads:
        if len(upload.content) > limits.max_image_bytes:
            raise _too_large_image(upload.name, len(upload.content), limits)
    return uploads


def decode_all(uploads: list[Upload], size: int, channels: int, rules: ValidationParams
               ) -> np.ndarray:
    """uint8 pixels (N, size, size, channels): each header checked, then
    visionops.core.pipeline's decoding."""
    pixels = []
    for upload in uploads:
        check_header(upload, rules)
        buffer = io.BytesIO(upload.content)
        try:
            pixels.append(decode_image(buffer, size, channels))
        except UnreadableImage as exc:
            reason = str(exc).removeprefix(f"{buffer}: ")
            raise BadInput(400, "not_an_image", f"{upload.name}: {reason}") from None
    return np.stack(pixels)


def check_header(upload: Upload, rules: ValidationParams) -> None:
    """Refuse, from the header alone, an image of a format or size validation refuses:
    no other format's parser reads the bytes, and no pixel is decoded. Past PIL's
    decompression-bomb limit is refused too, its warning taken as an error."""
    formats = list(rules.allowed_formats)
    if not upload.content:
        raise BadInput(400, "not_an_image", f"{upload.name}: an empty file")
    try:
        with _WARNINGS, warnings.catch_warnings():
            # refused below, naming the sides, with the side limits checked first
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.content), formats=formats) as image:
                found, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:  # twice the limit: raised by the open
        raise BadInput(413, "image_too_large_in_pixels", f"{upload.name}: {exc}") from None
    except Image.UnidentifiedImageError:
        found = image_format(upload.content)  # only from the signature, unparsed
        if found in formats:
            raise BadInput(400, "not_an_image", f"{upload.name}: not a readable image (a "
                                                f"{found} whose header does not parse)"
                           ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header that does not parse
        raise BadInput(400, "not_an_image", f"{upload.name}: not a readable image "
                                            f"({type(exc).__name__}: {exc})") from None
    if found not in formats:  # unidentified, or e.g. an MPO the JPEG parser found
        taken = " or ".join(formats)
        what = f"a {found} image, not {taken}" if found else f"not a {taken} image"
        raise BadInput(415, "unsupported_format", f"{upload.name}: {what} "
                       f"(validation.allowed_formats: {', '.join(formats)})")
    size = f"{upload.name}: {width}x{height} pixels"
    if max(width, height) > rules.max_side:
        raise BadInput(413, "image_too_large_in_pixels",
                       f"{size}, a side over validation.max_side ({rules.max_side})")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise BadInput(413, "image_too_large_in_pixels", f"{size}, more than PIL's "
                       f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?)")
    if min(width, height) < rules.min_side:
        raise BadInput(422, "image_too_small",
                       f"{size}, a side under validation.min_side ({rules.min_side})")


def _capped(request: Request, cap: int, held: Reservation) -> Request:
    """The request, its body cut off with _BodyTooLarge past `cap` bytes, each chunk
    covered by `held` before it is passed on."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise _BodyTooLarge
            held.cover(received)
        return message

    return Request(request.scope, receive)


async def _from_form(request: Request, limits: ServingParams) -> list[Upload]:
    most = limits.max_images_per_request
    try:
        async with asyncio.timeout(limits.read_timeout_seconds):
            form = await request.form(max_files=most + 1, max_fields=most + 1)
    except HTTPException as exc:  # Starlette's parser refusing the form
        if "Too many files" in str(exc.detail):
            raise _too_many(limits) from None
        raise BadInput(400, "bad_form", f"not a readable multipart form: {exc.detail}"
                       ) from None
    except TimeoutError:  # before OSError, which it is
        raise _read_timeout(limits) from None
    except OSError as exc:  # a large part spooled to a temporary file that failed
        raise _cannot_hold(exc) from None
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
            try:
                uploads.append(Upload(name, await file.read()))
            except OSError as exc:
                raise _cannot_hold(exc) from None
        return uploads
    finally:
        await form.close()


async def _from_json(request: Request, limits: ServingParams) -> list[Upload]:
    body = bytearray()
    try:
        async with (asyncio.timeout(limits.read_timeout_seconds),
                    contextlib.aclosing(request.stream()) as chunks):
            async for chunk in chunks:
                body += chunk
    except TimeoutError:
        raise _read_timeout(limits) from None
    holder = [body]
    del body  # the parser lets go of the raw body once it is parsed
    return await run_in_threadpool(_parse_json, holder, limits)  # megabytes: off the loop


def _parse_json(holder: list[bytearray], limits: ServingParams) -> list[Upload]:
    try:
        document = json.loads(holder.pop())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(400, "bad_json", f"the body is not JSON ({exc}): {EXPECTED}") from None
    images = document.get("images") if isinstance(document, dict) else document
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise BadInput(422, "bad_json", f"expected a list of base64 strings: {EXPECTED}")
    if len(images) > limits.max_images_per_request:
        raise _too_many(limits)
    uploads = []
    for index in range(len(images)):
        text, images[index] = images[index], None  # each string let go once decoded
        uploads.append(_from_base64(f"image-{index}", text, limits))
    return uploads


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


def _body_cap(image_bytes: int, limits: ServingParams) -> tuple[int, str]:
    """The most bytes a body may have, and the setting that says so."""
    most = limits.max_images_per_request
    return min((limits.max_request_bytes, "serving.max_request_bytes"),
               (most * (image_bytes + PART_OVERHEAD),
                f"what {most} images (max_images_per_request) of max_image_bytes take"),
               (limits.max_bytes_in_flight, "serving.max_bytes_in_flight"))


def _base64_length(size: int) -> int:
    return 4 * math.ceil(size / 3)


def _too_many(limits: ServingParams) -> BadInput:
    return BadInput(413, "too_many_images", f"more than {limits.max_images_per_request} "
                                            "images in one request (max_images_per_request)")


def _too_large_image(name: str, size: int, limits: ServingParams) -> BadInput:
    return BadInput(413, "image_too_large", f"{name}: {size} bytes, more than the "
                                            f"{limits.max_image_bytes} of max_image_bytes")


def _too_large_body(cap: int, what: str) -> BadInput:
    return BadInput(413, "body_too_large", f"the request body is larger than {cap} bytes "
                                           f"({what})")


def _read_timeout(limits: ServingParams) -> BadInput:
    return BadInput(408, "read_timeout", "the request body did not arrive within "
                                         f"{limits.read_timeout_seconds:g} s "
                                         "(serving.read_timeout_seconds)")


def _cannot_hold(exc: OSError) -> BadInput:
    return BadInput(507, "insufficient_storage", "the upload could not be held while it "
                                                 f"was read ({exc.strerror or exc}); try "
                                                 "again later", retry_after="1")
