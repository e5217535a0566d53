"""Serving stored blobs with HTTP Range (206, resumable downloads) and 416 for bad ranges."""

from __future__ import annotations

from starlette.responses import FileResponse, Response

from update_server.errors import NotFound
from update_server.storage import BlobStorage


def blob_response(storage: BlobStorage, key: str, *, filename: str | None = None,
                  media_type: str = "application/octet-stream") -> Response:
    """The blob at ``key``. Starlette's FileResponse implements single and multi ranges and 416."""
    path = storage.local_path(key)
    if path is None:
        raise NotFound(f"no stored file {key!r}")
    return FileResponse(path, media_type=media_type, filename=filename,
                        headers={"Cache-Control": "no-cache"})
