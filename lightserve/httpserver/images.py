"""Images of multimodal requests, on the httpserver side: read, check, reference, release.

1. `ImageIntake.prepare` (no server state touched): decode each image reference (base64,
   `data:` URI, or an http(s) URL when `--allow_remote_images`), enforce the limits (count per
   request, encoded bytes, pixel count read from the header *before* decoding, so a
   decompression bomb costs nothing; then a full decode, so corrupt data is refused here and
   not inside a visual batch), and expand each image tag of the prompt into the model's run of
   placeholder tokens. Every failure is a 422 naming the image.
2. `ImageIntake.acquire`: take references to the images' cache records (same bytes, same
   record: an image sent again is not encoded again) and put the bytes of new ones into shared
   memory. When every record is referenced, wait up to `wait_s` for requests to end, then
   refuse with 429.
3. `ImageIntake.release` when the request ends, however it ends.

The rpyc calls and image decoding run on a small thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import httpx
from PIL import Image, UnidentifiedImageError

from lightserve.cache_manager.client import CacheClient
from lightserve.cache_manager.image_cache import NeverFits
from lightserve.cache_manager.protocol import CacheStats, ImageSpec, RecordRef
from lightserve.httpserver.errors import ApiError, validation_error
from lightserve.io_struct import ImageItem
from lightserve.server_args import ServerArgs
from lightserve.utils.run_paths import RunPaths
from lightserve.visual.spec import IMAGE_FORMATS, VisionSpec

logger = logging.getLogger(__name__)

OVERLOADED = "overloaded"  # TGI's error_type for 429
REMOTE_TIMEOUT_S = 10.0
ALLOC_RETRY_S = 0.02


@dataclass(frozen=True)
class ImageSource:
    """Where one image comes from: TGI's `multimodal_params.images[]` entry `{"type", "data"}`
    or an OpenAI `image_url.url`."""

    kind: str  # "base64": raw base64 or a data: URI; "url": an http(s) URL (or a data: URI)
    data: str

    @classmethod
    def from_url(cls, url: str) -> "ImageSource":
        return cls("base64" if url.startswith("data:") else "url", url)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20  # encoded image size
    max_pixels: int = 25_000_000  # width * height, checked from the header before decoding
    max_images: int = 4  # per request
    allow_remote: bool = False  # fetch http(s) URLs (off: the server makes no outbound requests)

    @classmethod
    def from_args(cls, args: ServerArgs) -> "ImageLimits":
        return cls(args.max_image_bytes, args.max_image_pixels, args.max_images_per_request, args.allow_remote_images)

    def body_limit(self, text_limit: int) -> int:
        """A request body that may carry `max_images` base64 images beside its text."""
        per_image = 4 * math.ceil(self.max_bytes / 3) + 256  # base64 + data-URI header and JSON
        return text_limit + self.max_images * per_image


@dataclass(frozen=True)
class LoadedImage:
    md5: str
    data: bytes
    token_start: int
    token_num: int


@dataclass(frozen=True)
class PreparedImages:
    """A request's prompt with image tags expanded, and its checked images (no references yet)."""

    prompt_ids: list[int]
    images: list[LoadedImage]


# ---- reading and checking ----------------------------------------------------------------------

def _bad(index: int, why: str) -> ApiError:
    return validation_error(f"image {index}: {why}", param="images")


def decode_base64(index: int, text: str, max_bytes: int) -> bytes:
    """Raw base64 or a `data:[mime];base64,` URI -> bytes, refusing oversized input unread."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _bad(index, "a data: URI must be base64-encoded (data:image/png;base64,...)")
        if not header[5:].startswith("image/") and header != "data:;base64":
            raise _bad(index, f"data: URI of type {header[5:-7]!r} is not an image")
    if len(text) > 4 * math.ceil(max_bytes / 3) + 4096:  # leave room for line breaks
        raise _bad(index, f"larger than {max_bytes} bytes")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(index, "not valid base64") from None
    if not data:
        raise _bad(index, "empty")
    if len(data) > max_bytes:
        raise _bad(index, f"{len(data)} bytes; the limit is {max_bytes}")
    return data


async def fetch_remote(index: int, url: str, max_bytes: int) -> bytes:
    """GET an http(s) image, reading at most `max_bytes`."""
    if urlparse(url).scheme not in ("http", "https"):
        raise _bad(index, "only http(s) URLs, data: URIs and base64 are accepted")
    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _bad(index, f"fetching {url} answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _bad(index, f"{url} is larger than {max_bytes} bytes")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _bad(index, f"cannot fetch {url}: {type(exc).__name__}") from None
    if not size:
        raise _bad(index, f"{url} is empty")
    return b"".join(chunks)


def check_image(index: int, data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a decodable image within the pixel limit, else a 422.

    The size comes from the header (PIL opens lazily); only then is the image decoded fully.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _bad(index, f"{width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            image.load()
    except Image.DecompressionBombError:
        raise _bad(index, f"too many pixels; the limit is {max_pixels}") from None
    except UnidentifiedImageError:
        raise _bad(index, f"not an image in a format this server reads ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated / corrupt data
        raise _bad(index, f"corrupt image data ({exc})") from None
    return width, height


def expand_image_tags(prompt_ids: list[int], image_token_id: int, tokens_per_image: int, n_images: int,
                      tag: str) -> tuple[list[int], list[int]]:
    """Replace each image tag token with `tokens_per_image` placeholders, as the model's
    processor does; returns (expanded ids, first placeholder position of each image)."""
    tags = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if len(tags) != n_images:
        raise validation_error(f"the prompt has {len(tags)} image tags ({tag}) for {n_images} images; "
                               "put one tag where each image goes", param="inputs")
    out: list[int] = []
    starts: list[int] = []
    prev = 0
    for pos in tags:
        out.extend(prompt_ids[prev:pos])
        starts.append(len(out))
        out.extend([image_token_id] * tokens_per_image)
        prev = pos + 1
    out.extend(prompt_ids[prev:])
    return out, starts


# ---- the intake ------------------------------------------------------------------------------

class ImageIntake:
    def __init__(self, cache: CacheClient, spec: VisionSpec, image_tag: str, limits: ImageLimits,
                 wait_s: float = 10.0):
        self.cache = cache
        self.spec = spec
        self.image_tag = image_tag
        self.limits = limits
        self.wait_s = wait_s
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lightserve-images")

    @classmethod
    def for_server(cls, args: ServerArgs, paths: RunPaths, model_dir: str, tokenizer) -> "ImageIntake":
        """The intake of a server instance (the cache manager must be running)."""
        spec = VisionSpec.from_model_dir(model_dir)
        tag = tokenizer.convert_ids_to_tokens(spec.image_token_id)
        return cls(CacheClient(paths), spec, tag, ImageLimits.from_args(args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.cache.close()

    async def stats(self) -> CacheStats:
        """The cache manager's counters (records, evictions, images encoded)."""
        return await self._run(self.cache.stats)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prepare(self, prompt_ids: list[int], inputs: list[ImageSource]) -> PreparedImages:
        """Read and check the images and expand the prompt; raises 422 `ApiError`s."""
        if len(inputs) > self.limits.max_images:
            raise validation_error(f"{len(inputs)} images; at most {self.limits.max_images} per request", param="images")
        datas = []
        for i, item in enumerate(inputs):
            if item.kind not in ("base64", "url"):
                raise _bad(i, f"type {item.kind!r} is not supported (use \"base64\" or \"url\")")
            if item.kind == "url" and not item.data.startswith("data:"):
                if not self.limits.allow_remote:
                    raise _bad(i, "remote image URLs are disabled on this server (--allow_remote_images); send base64")
                datas.append(await fetch_remote(i, item.data, self.limits.max_bytes))
            else:
                datas.append(await self._run(decode_base64, i, item.data, self.limits.max_bytes))
        for i, data in enumerate(datas):
            await self._run(check_image, i, data, self.limits.max_pixels)
        ids, starts = expand_image_tags(prompt_ids, self.spec.image_token_id, self.spec.tokens_per_image,
                                        len(datas), self.image_tag)
        images = [LoadedImage(hashlib.md5(d).hexdigest(), d, s, self.spec.tokens_per_image) for d, s in zip(datas, starts)]
        return PreparedImages(ids, images)

    async def acquire(self, prepared: PreparedImages) -> list[ImageItem]:
        """Reference the images' records (bytes in shared memory); 429 if the cache stays full
        for `wait_s`, 422 if the request has more images than the cache holds. Pair with
        `release`; a cancelled call holds nothing."""
        items = [ImageSpec(img.md5, len(img.data), img.token_num) for img in prepared.images]
        deadline = time.monotonic() + self.wait_s
        while True:
            records = await self._alloc(items)
            if records is not None:
                break
            if time.monotonic() >= deadline:
                raise ApiError(429, "every image cache record is in use by running requests; retry later", OVERLOADED)
            await asyncio.sleep(ALLOC_RETRY_S)
        taken = [ref.record_id for ref in records]
        try:
            for img, ref in zip(prepared.images, records):
                if not ref.data_ready:
                    await self._run(self.cache.put_data, ref.record_id, img.data)
        except BaseException:
            self._release_ids(taken)
            raise
        return [ImageItem(img.md5, ref.record_id, img.token_start, img.token_num)
                for img, ref in zip(prepared.images, records)]

    async def _alloc(self, items: list[ImageSpec]) -> Optional[list[RecordRef]]:
        future = self._pool.submit(self.cache.alloc, items)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The call may still succeed in its thread: give back whatever it took.
            future.add_done_callback(self._release_taken)
            raise
        except NeverFits as exc:
            raise validation_error(str(exc), param="images") from None

    def _release_taken(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None and future.result() is not None:
            self._release_ids([ref.record_id for ref in future.result()])

    def release(self, images: list[ImageItem]) -> None:
        """Drop a finished request's references (never blocks the caller)."""
        if images:
            self._release_ids([img.record_id for img in images])

    def _release_ids(self, record_ids: list[int]) -> None:
        def run() -> None:
            try:
                self.cache.release(record_ids)
            except Exception:  # a dead cache manager is reported by the supervisor
                logger.exception("httpserver: releasing image records %s failed", record_ids)

        self._pool.submit(run)
