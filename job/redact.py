"""Secrets never leave the process: every message the job prints or logs, and every record it writes from an
outside reply, goes through `scrub`.

A secret is the value of HF_TOKEN, WANDB_API_KEY or JUDGE_API_KEY (read from the environment when scrubbing,
plus any value `register`ed, e.g. from .env), and the password of any URL. Endpoints echo keys back in error
bodies and replies, and libraries put request URLs into their messages; scrubbing the text at the few places
it leaves (the logging record factory, the top-level error message, eval/judge.jsonl) covers them all.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

SECRET_ENV = ("HF_TOKEN", "WANDB_API_KEY", "JUDGE_API_KEY")
MASK = "***"
# Shorter values are not scrubbed: replacing a 3-letter "key" everywhere would garble every message, and a
# key that short protects nothing (real keys are 20 characters or more).
MIN_SECRET_CHARS = 6

_registered: set[str] = set()
# scheme://user:password@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/@'\"<>]+@", re.IGNORECASE)
# ?api_key=...&token=...: the value of a query parameter whose name says it carries a credential.
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][^=&\s#]*(?:key|token|secret|passw|pwd|auth|sig|credential)[^=&\s#]*=)[^&\s#'\"<>]+",
    re.IGNORECASE,
)


def register(*values: str | None) -> None:
    """Scrub these values too (settings read from .env, a URL's password)."""
    for v in values:
        if v and len(v.strip()) >= MIN_SECRET_CHARS:
            _registered.add(v.strip())


def secrets() -> list[str]:
    found = {os.environ.get(n, "").strip() for n in SECRET_ENV} | _registered
    # Longest first, so a secret that contains another is masked whole.
    return sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with every known secret, URL password and credential-like query value replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    for s in secrets():
        text = text.replace(s, MASK)
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    return _QUERY_SECRET.sub(lambda m: m["name"] + MASK, text)


def scrub_obj(obj):
    """A JSON-like value with every string in it scrubbed (keys included)."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub_obj(k): scrub_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(v) for v in obj]
    return obj


def public_url(url: str) -> str:
    """The URL without user:password@ and without a query string or fragment, any of which can carry a key."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def register_url(url: str) -> None:
    """Scrub the password of `url`, and the Basic credential made of it: httpx sends a URL's user:password@
    as `Authorization: Basic base64(user:password)`, which an endpoint may echo back."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if parts.password:
        user = unquote(parts.username or "")
        password = unquote(parts.password)
        register(parts.password, password, base64.b64encode(f"{user}:{password}".encode()).decode())


# --- logging: every record, from our loggers and every library's, is scrubbed when it is made -------------
_base_factory = None


def _factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # a malformed call: leave it to logging's own error report
        return record
    record.msg, record.args = scrub(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
    return record


def install_log_scrubbing() -> None:
    """Wrap logging's record factory once; records are scrubbed whatever handler or formatter shows them."""
    global _base_factory
    if _base_factory is None:
        _base_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_factory)
