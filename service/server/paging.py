"""Opaque page tokens: an offset bound to the query it belongs to, so a token cannot be reused across queries."""

from __future__ import annotations

import base64
import hashlib

from featureviz.errors import InvalidSpec

__all__ = ["page_bounds", "next_token"]


def _query_digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:12]


def page_bounds(page_size: int, page_token: str, query: str, *, default: int, maximum: int) -> tuple[int, int]:
    """-> (offset, limit) from a request's page_size and page_token."""
    if page_size < 0:
        raise InvalidSpec("page_size", f"must be >= 0, got {page_size}")
    limit = min(page_size or default, maximum)
    if not page_token:
        return 0, limit
    try:
        text = base64.urlsafe_b64decode(page_token.encode()).decode()
        offset_text, digest = text.split(":", 1)
        offset = int(offset_text)
    except (ValueError, UnicodeDecodeError):
        raise InvalidSpec("page_token", "not a token this server issued; start again without page_token") from None
    if digest != _query_digest(query) or offset < 0:
        raise InvalidSpec("page_token", "the token belongs to another query (filter or resource changed); "
                                        "start again without page_token")
    return offset, limit


def next_token(offset: int, limit: int, returned: int, total: int | None, query: str) -> str:
    end = offset + returned
    if returned < limit or (total is not None and end >= total):
        return ""
    return base64.urlsafe_b64encode(f"{end}:{_query_digest(query)}".encode()).decode()
