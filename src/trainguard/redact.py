"""Secrets out of everything trainguard prints, logs or writes.

trainguard records command lines (the run lock's holder record), exception messages (crash records) and webhook
URLs (failure logs). Any of them can carry a credential: ``--hub_token hf_...``, ``WANDB_API_KEY=...``, a Slack
webhook's secret path, ``?token=...``. These functions replace the secret part with :data:`MARK` and keep the rest,
so a message still says which flag, which host, which command:

- :func:`redact_argv`: a command line as a list (values of secret-looking flags and ``KEY=VALUE`` arguments,
  token-like words anywhere).
- :func:`redact_url`: a URL (user info, query values, fragment, path segments that look like keys).
- :func:`redact_text`: free text (URLs, ``--flag value``, ``key=value`` / ``key: value`` and token-like words in it).
- :func:`redact_command`: a command line already joined into one string (older holder records).
- :func:`redact_json`: a JSON-like record, recursively (a value under a secret-looking key is replaced whole).

Redacting is idempotent and never raises. It is a safety net for text trainguard did not choose, not a guarantee:
a secret with no recognisable flag, name or shape passes through.

Example::

    from trainguard.redact import redact_argv
    redact_argv(["train.py", "--hub_token", "hf_abcdefghijklmnopqrstuvwxyz012345"])
    # ['train.py', '--hub_token', '***']
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MARK",
    "is_secret_name",
    "redact_argv",
    "redact_command",
    "redact_json",
    "redact_text",
    "redact_url",
]

#: What a secret is replaced with.
MARK = "***"

# Words that make a flag or key name secret when they appear as a whole word ("hub_token", "api-key", "apiKey"),
# and not as part of one ("max_new_tokens", "tokenizer_name", "keyboard").
_SECRET_WORDS = frozenset(
    {"token", "secret", "secrets", "password", "passwd", "key", "apikey", "credential", "credentials"}
)

# Credentials recognisable by their shape alone, wherever they appear.
_TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic style
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]+){0,2}"  # JWT
    r")"
)
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{6,}")
_VALUE = r"('[^']*'|\"[^\"]*\"|[^\s'\",;&]+)"
# --flag=value or --flag value (a value does not start with a dash).
_FLAG_RE = re.compile(r"(?<![\w-])(-{1,2}[A-Za-z][\w.-]*)(=|\s+)(?!-)" + _VALUE)
# key=value, key: value, "key": "value" (JSON and Python reprs).
_KEY_RE = re.compile(r"(?<![\w.-])(['\"]?)([A-Za-z_][\w.-]*)\1(\s*[:=]\s*)" + _VALUE)
_ENV_ARG_RE = re.compile(r"^([A-Za-z_][\w.-]*)=(.*)$", re.S)
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# A URL path segment that is a key rather than a name: 16+ characters mixing two of lower case, upper case and
# digits (Slack and Discord webhook URLs carry their secret in the path).
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]{16,}$")


def is_secret_name(name: str, *, camel: bool = True) -> bool:
    """True when a flag or key name holds a secret word (token, secret, password, key, ...) as a whole word.

    Example::

        is_secret_name("--hub_token"), is_secret_name("max_new_tokens")   # (True, False)
    """
    text = name.lstrip("-")
    if camel:
        text = _CAMEL_RE.sub("_", text)
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", text.lower()))


def _tokens(text: str) -> str:
    return _TOKEN_RE.sub(MARK, text)


def _keylike(segment: str) -> bool:
    if not _SEGMENT_RE.match(segment):
        return False
    classes = (any(c.islower() for c in segment), any(c.isupper() for c in segment), any(c.isdigit() for c in segment))
    return sum(classes) >= 2


def redact_url(url: str) -> str:
    """``url`` with its user info, query values, fragment and key-like path segments replaced by :data:`MARK`;
    scheme, host, port and the rest of the path stay, so the message still says where.

    Example::

        redact_url("https://u:p@hooks.example.com/hook?token=abc")   # 'https://***@hooks.example.com/hook?token=***'
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # not parseable as a URL (an unclosed IPv6 bracket): keep the scheme only
        scheme, sep, _rest = url.partition("://")
        return f"{scheme}{sep}{MARK}" if sep else MARK
    if "@" in netloc:
        netloc = MARK + "@" + netloc.rsplit("@", 1)[1]
    path = "/".join(MARK if _keylike(seg) else _tokens(seg) for seg in parts.path.split("/"))
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            key, sep, value = item.partition("=")
            pairs.append(f"{key}={MARK}" if sep and value else (item if sep else MARK))
        query = "&".join(pairs)
    fragment = MARK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def _flag(match: re.Match[str]) -> str:
    flag, sep = match.group(1), match.group(2)
    return f"{flag}{sep}{MARK}" if is_secret_name(flag, camel=True) else match.group(0)


def _key(match: re.Match[str]) -> str:
    # No camelCase split here: "KeyError: 'labels'" in an exception message is not a secret.
    quote, key, sep, value = match.group(1), match.group(2), match.group(3), match.group(4)
    if not is_secret_name(key, camel=False):
        return match.group(0)
    if value[:1] in ("'", '"'):
        return f"{quote}{key}{quote}{sep}{value[0]}{MARK}{value[0]}"
    return f"{quote}{key}{quote}{sep}{MARK}"


def redact_text(text: str) -> str:
    """Free text with URLs (:func:`redact_url`), ``Bearer``/``Basic`` credentials, values of secret-looking
    ``--flag value`` / ``key=value`` / ``key: value`` pairs, and token-like words (``hf_...``, ``sk-...``,
    ``ghp_...``, ``xoxb-...``, ``AKIA...``, JWTs) replaced by :data:`MARK`.

    Example::

        redact_text("POST to https://h/x?sig=abc failed, token=s3cr3t")   # '... https://h/x?sig=*** ..., token=***'
    """
    if not isinstance(text, str):
        return text
    out = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    out = _BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MARK}", out)
    out = _FLAG_RE.sub(_flag, out)
    out = _KEY_RE.sub(_key, out)
    return _tokens(out)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with every secret replaced by :data:`MARK`: the value of a secret-looking flag
    (``--hub_token V``, ``--api-key=V``, ``--wandb_api_key V``, any flag with token/secret/password/key as a word),
    of a ``KEY=VALUE`` argument with such a name (``HF_TOKEN=V``, ``trainer.hub_token=V``), and token-like words and
    URL credentials anywhere. The flags themselves stay.

    Example::

        redact_argv(["run.py", "--api-key=abc", "HF_TOKEN=x", "--lr", "1e-4"])
        # ['run.py', '--api-key=***', 'HF_TOKEN=***', '--lr', '1e-4']
    """
    out: list[str] = []
    value_next = False
    for arg in argv:
        arg = str(arg)
        if value_next and not arg.startswith("--"):
            out.append(MARK)
            value_next = False
            continue
        value_next = False
        if arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit():
            flag, sep, _value = arg.partition("=")
            if is_secret_name(flag):
                if sep:
                    out.append(f"{flag}={MARK}")
                else:
                    out.append(arg)
                    value_next = True
                continue
        else:
            env = _ENV_ARG_RE.match(arg)
            if env and is_secret_name(env.group(1)):
                out.append(f"{env.group(1)}={MARK}")
                continue
        out.append(redact_text(arg))
    return out


def redact_command(command: str) -> str:
    """A command line already joined into one string (as older holder records hold it), redacted like
    :func:`redact_argv`; text that does not split as a shell line is redacted as free text."""
    if not isinstance(command, str):
        return command
    try:
        words = shlex.split(command)
    except ValueError:
        return redact_text(command)
    redacted = redact_argv(words)
    return command if redacted == words else shlex.join(redacted)


def redact_json(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted (:func:`redact_text`) and the whole value under a
    secret-looking key replaced by :data:`MARK`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (MARK if isinstance(k, str) and is_secret_name(k) and v not in (None, "") else redact_json(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_json(v) for v in value]
    return value
