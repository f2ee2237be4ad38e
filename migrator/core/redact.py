"""Keeping secrets and PII out of logs, errors and reports: masked emails, IPs and URLs."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# (a match starts only where a run of such characters does: tried from every character of a
# long run, as a half-megabyte key name is, it took quadratic time)
EMAIL = re.compile(r"(?<![^\s:/@'\"(),])[^\s:/@'\"(),]+@[^\s:/@'\"(),]+\.[^\s:/@'\"(),]+")
IPV4 = re.compile(r"\b(\d{1,3})\.(\d{1,3})\.\d{1,3}\.\d{1,3}\b")
# An IPv6 address has '::' or at least four colons (a time of day has two); it may follow a
# key segment such as "ip:".
IPV6 = re.compile(
    r"(?:(?<![\w:])|(?<=[A-Za-z]:))"
    r"(?=[0-9a-fA-F:]*::|(?:[0-9a-fA-F]{1,4}:){3,}[0-9a-fA-F]{1,4}(?!\w))"
    r"([0-9a-fA-F]{0,4}):(?:[0-9a-fA-F]{0,4}:)*[0-9a-fA-F]{0,4}(?!\w)"
)
DSN_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)
USERINFO_SECRET = re.compile(r"(:)[^:/@\s]+@")
URL = re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)  # (linear, as EMAIL)


def mask_email(email: str) -> str:
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain[:1]}***"


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        # not a well-formed URL (a typo, a key=value DSN): mask whatever looks like a secret
        text = DSN_PASSWORD.sub(r"\1***", url)
        return USERINFO_SECRET.sub(r"\1***@", text)
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redact_secrets(text: str) -> str:
    """Mask URLs' passwords and emails anywhere in a message, and nothing else: what a service's
    own error may show, whose host and port say which server failed."""
    pieces, at = [], 0
    for m in URL.finditer(text):
        pieces += [_plain(text[at:m.start()]), _quoted_url(m.group(0))]
        at = m.end()
    return "".join([*pieces, _plain(text[at:])])


def _plain(text: str) -> str:
    return EMAIL.sub(lambda m: mask_email(m.group(0)), DSN_PASSWORD.sub(r"\1***", text))


def _quoted_url(url: str) -> str:
    """A URL in a message: its password masked, and emails after its host; its user@host is
    no email, and is kept."""
    scheme, sep, rest = redact_url(url).partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc}{slash}{_plain(path)}"


def redact_text(text: str) -> str:
    """Mask URLs' passwords, emails and IP addresses anywhere in a message (one that may quote
    the data: a key name, a value, a reason)."""
    text = IPV4.sub(r"\1.\2.x.x", redact_secrets(text))
    return IPV6.sub(r"\1:x", text)



CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """Control characters (a newline in a key name) escaped as Python writes them, so a line of a
    table stays one line."""
    return CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)
