"""The one redaction point (invariant 8): every output path passes its text through `redact_text`.

Plans register their secret values here the moment they are interpolated, before anything can
print, log or store them; files, the ledger, stdout/stderr and tracebacks all pass through here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

_secrets: set[str] = set()
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words and digits everywhere

# scheme://user:password@host — the password runs to the *last* `@` of the word, so a password
# holding `@ / : #` is masked whole, whatever a URL parser would make of it
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^\s]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)[^&\s]*")
# PostgreSQL shortens long values in its messages ("Failing row contains (…, LongKeyZZZ...)"):
# a secret at least this long is also masked where only its beginning appears
PREFIX_LENGTH = 8
MIN_PREFIX_SECRET = 12
_KV_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.|'')*'|\S+)")


def dsn_password(dsn: str) -> str | None:
    """The password in a DSN (URL or key=value form), as written, or None."""
    if "://" in dsn:
        rest = dsn.split("://", 1)[1]
        if "@" in rest:
            userinfo = rest.rsplit("@", 1)[0]
            if ":" in userinfo:
                return userinfo.split(":", 1)[1] or None
        m = re.search(r"(?i)[?&]password=([^&\s]*)", dsn)
        return m.group(1) if m else None
    m = _KV_PASSWORD.search(dsn)
    return m.group(2).strip("'") if m else None


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by `***` (URL and key=value forms)."""
    if "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        if "@" in rest:
            userinfo, host = rest.rsplit("@", 1)
            if ":" in userinfo:
                rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
        return _QUERY_PASSWORD.sub(r"\1***", f"{scheme}://{rest}")
    return _KV_PASSWORD.sub(r"\1***", dsn)


def register(values: Iterable[str]) -> None:
    """Treat these values as secrets from now on; a DSN also registers its password."""
    for value in values:
        if not value:
            continue
        _secrets.add(value)
        password = dsn_password(value)
        if password:
            _secrets.update({password, unquote(password)})


def registered() -> frozenset[str]:
    return frozenset(_secrets)


def _token_like(secret: str) -> bool:
    """A long single token (a key, a password): the kind a database message may cut short. A
    connection string or a phrase is masked whole only, or its beginning would mask ordinary
    text (every `host=/tmp…` of every report)."""
    return len(secret) >= MIN_PREFIX_SECRET and not any(c.isspace() or c in "=:/" for c in secret)


def _mask_beginnings(text: str, secret: str) -> str:
    """Mask every run of text that starts like `secret` (its first PREFIX_LENGTH characters)
    and goes on matching it: the secret cut short by a database message."""
    head = secret[:PREFIX_LENGTH]
    out: list[str] = []
    i = 0
    while (j := text.find(head, i)) != -1:
        k = j + len(head)
        while k < len(text) and k - j < len(secret) and text[k] == secret[k - j]:
            k += 1
        out += [text[i:j], "***"]
        i = k
    out.append(text[i:])
    return "".join(out)


def redact_all(text: str, secrets: Iterable[str]) -> str:
    """Replace every given secret value and every DSN password in free text."""
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= MIN_SECRET_LENGTH and s in text:
            text = text.replace(s, redact_dsn(s) if "://" in s else "***")
        if _token_like(s) and s[:PREFIX_LENGTH] in text:
            text = _mask_beginnings(text, s)
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def redact_text(text: str) -> str:
    """Free text with every registered secret and every DSN password replaced."""
    return redact_all(text, _secrets)


def redact_value(value: Any) -> Any:
    """The same, through JSON-like data (dicts, lists, tuples, strings)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):  # keys too: a query's column names may carry a value
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
