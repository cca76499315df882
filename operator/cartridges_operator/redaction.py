"""Keep the credentials that URLs carry (``user:password@``, a presigned URL's signature or token in its query) out of
what the operator reports and stores: status messages are posted as Events and read by anyone who may read the
resource, stored documents by anyone with the bucket."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#\s'\"]*@", re.IGNORECASE)
_QUERY = re.compile(r"\b((?!(?:s3|file)://)[a-z][a-z0-9+.-]*://[^?#\s'\"]*)[?#][^\s'\"]*", re.IGNORECASE)


def redacted(text: str) -> str:
    """``text`` with every URL in it stripped of user information, and of its query and fragment (shown as
    ``?<redacted>``, so that one can tell it had one), except a store URI's: there ``?`` and ``#`` belong to the key."""
    return _QUERY.sub(r"\1?<redacted>", _USERINFO.sub(r"\1", text))
