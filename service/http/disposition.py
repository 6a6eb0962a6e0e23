"""The file name in a ``Content-Disposition`` header (RFC 6266), read in one pass.

``email.message.Message.get_filename`` re-scans the header once per parameter it splits off, so its
time grows with the square of the parameters: a header of 15,000 ``;`` (within the 16 KB header
limit) held the event loop for about 122 ms (issue 24). Here each parameter is found with
``str.find`` from where the previous one ended, a quoted string is matched by one regular expression
whose alternatives never overlap, and no more than :data:`MAX_PARAMETERS` parameters are read (a
disposition has one to three), so the work is linear in the header's length and the Python-level
steps are bounded by a constant.

``filename*`` (RFC 8187's ``charset'language'percent-encoded``) wins over ``filename``, as RFC 6266
section 4.3 says; RFC 2231 continuations (``filename*0=``) are not HTTP's and are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote

MAX_PARAMETERS = 32
_SEPARATORS = re.compile(r"[;\s]*")
_SPACE = re.compile(r"\s*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)  # a quoted-string, from its opening quote
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_HELD = "\x00"  # never in a header value (the HTTP parser refuses NUL), so it can hold a place
_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "iso-8859-1"}  # the two RFC 8187 requires


def _unescape(text: str) -> str:
    """A quoted-string's content without its escapes: ``\\x`` is ``x``.

    By three ``str.replace`` (escaped backslashes held aside, the other backslashes dropped, the held
    ones put back as one backslash each): a pass each in C. ``re.sub`` with a group reference would
    call Python once per escape (CPython 3.11).
    """
    if "\\" not in text:
        return text
    if _HELD in text:
        return _ESCAPE.sub(lambda match: match.group(1), text)
    return text.replace("\\\\", _HELD).replace("\\", "").replace(_HELD, "\\")


def parameters(header: str) -> Iterator[tuple[str, str]]:
    """``(name, value)`` of each parameter after the disposition type, names lower-cased, values unquoted."""
    end = len(header)
    at = header.find(";")
    for _ in range(MAX_PARAMETERS):
        if at < 0:
            return
        at = _SEPARATORS.match(header, at).end()
        if at >= end:
            return
        semicolon = header.find(";", at)
        stop = end if semicolon < 0 else semicolon
        equals = header.find("=", at, stop)
        if equals < 0:  # a parameter without a value
            at = semicolon
            continue
        name = header[at:equals].strip().lower()
        at = _SPACE.match(header, equals + 1).end()
        if at < end and header[at] == '"':
            quoted = _QUOTED.match(header, at)
            if quoted is None:  # never closed: the rest of the header is the value
                yield name, _unescape(header[at + 1 :])
                return
            yield name, _unescape(quoted.group(1))
            at = header.find(";", quoted.end())
        else:
            yield name, header[at:stop].strip()
            at = semicolon


def _extended(value: str) -> str | None:
    """RFC 8187's ``utf-8'en'%e2%82%ac.jpg``: None where the charset is unknown or the value malformed."""
    charset, quote, rest = value.partition("'")
    language_end = rest.find("'")
    encoding = _CHARSETS.get(charset.strip().lower())
    if not quote or language_end < 0 or encoding is None:
        return None
    return unquote(rest[language_end + 1 :], encoding=encoding, errors="replace")


def filename(header: str) -> str | None:
    """The file name the header gives (``filename*`` before ``filename``), or None."""
    plain = extended = None
    for name, value in parameters(header):
        if name == "filename*" and extended is None:
            extended = _extended(value)
        elif name == "filename" and plain is None:
            plain = value
    return (extended or plain or "").strip() or None  # blanks around a name are no part of it (as email reads it)
