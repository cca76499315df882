"""Keep the credentials that URLs carry (``user:password@``, a presigned URL's signature or token in its query) out of
what the operator reports and stores: status messages are posted as Events and read by anyone who may read the
resource, stored documents by anyone with the bucket."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# Only whitespace, or the path, query or fragment, ends a URL's user information or query here: a quote may be in a
# password (RFC 3986 allows ' unencoded), so one closing a quoted URL is redacted along with the query before it.
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@", re.IGNORECASE)
_QUERY = re.compile(r"\b((?!(?:s3|file)://)[a-z][a-z0-9+.-]*://[^?#\s]*)[?#]\S*", re.IGNORECASE)
QUERY_REDACTED = "?<redacted>"


def redacted(text: str) -> str:
    """``text`` with every URL in it stripped of user information, and of its query and fragment (shown as
    ``?<redacted>``, so that one can tell it had one), except a store URI's: there ``?`` and ``#`` belong to the key.
    For text that quotes URLs in any shape; a URL on its own: ``redacted_url``."""
    return _QUERY.sub(rf"\1{QUERY_REDACTED}", _USERINFO.sub(r"\1", text))


def redacted_url(url: str) -> str:
    """``url`` as shown and stored (a document id): taken apart by ``urlsplit``, so that no character in the password
    can hide it, without its user information, query and fragment (``?<redacted>`` when it had one); ``redacted``'s
    best for a URL that ``urlsplit`` refuses (an unclosed IPv6 bracket)."""
    try:
        parts = urlsplit(without_login(url)[0])
    except ValueError:
        return redacted(url)
    shown = urlunsplit(parts._replace(query="", fragment=""))
    return shown + QUERY_REDACTED if parts.query or parts.fragment else shown


def without_login(url: str) -> tuple[str, str | None]:
    """``url`` without its ``user:password@``, and that user information (``None``: it has none)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    return urlunsplit(parts._replace(netloc=hostport)), userinfo
