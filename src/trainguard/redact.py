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

Besides names and shapes, every function replaces the exact values of the secret environment variables set when it
runs (:func:`secret_env_values`: ``HF_TOKEN``, ``WANDB_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, any ``*_TOKEN``,
``*_API_KEY``, ...), so a token with no recognisable shape is still hidden wherever it appears. A command line
(:func:`redact_argv`) also hides a whole argument shaped like a W&B key (40 hex digits) or an AWS secret access key
(40 characters of ``[A-Za-z0-9/+]`` mixing upper case, lower case and digits).

Redacting is idempotent and never raises. It is a safety net for text trainguard did not choose, not a guarantee:
a secret with no recognisable flag, name, shape or environment variable passes through.

Example::

    from trainguard.redact import redact_argv
    redact_argv(["train.py", "--hub_token", "hf_abcdefghijklmnopqrstuvwxyz012345"])
    # ['train.py', '--hub_token', '***']
"""

from __future__ import annotations

import os
import re
import shlex
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "MARK",
    "SECRET_ENV_NAMES",
    "SECRET_ENV_SUFFIXES",
    "is_secret_env",
    "is_secret_name",
    "redact_argv",
    "redact_command",
    "redact_json",
    "redact_text",
    "redact_url",
    "secret_env_values",
]

#: What a secret is replaced with.
MARK = "***"

#: Environment variables whose value is a credential (besides any name ending in :data:`SECRET_ENV_SUFFIXES`).
SECRET_ENV_NAMES = frozenset(
    {
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_API_TOKEN",
        "WANDB_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GITHUB_TOKEN",
        "GH_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "COMET_API_KEY",
        "NEPTUNE_API_TOKEN",
        "SLACK_WEBHOOK_URL",
        "TRAINGUARD_WEBHOOK_URL",  # alerts.WEBHOOK_ENV (not imported: alerts imports this module)
    }
)
#: Name endings that make any environment variable a credential (``DATABRICKS_TOKEN``, ``MY_API_KEY``, ...).
SECRET_ENV_SUFFIXES = ("_TOKEN", "_SECRET", "_API_KEY", "_PASSWORD", "_SECRET_KEY", "_WEBHOOK_URL")
# A shorter value is not redacted: "1", "true" or "none" in a *_TOKEN variable (HF_HUB_DISABLE_IMPLICIT_TOKEN=1) is
# a switch, and replacing it everywhere would garble every message while hiding nothing.
_MIN_ENV_VALUE = 8

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
# Whole command-line arguments (or values of --flag=value / KEY=VALUE) shaped like a credential with no prefix of its
# own: a W&B API key (40 hex digits) and an AWS secret access key (40 base64-ish characters). Only in command lines:
# in free text 40 hex digits are far more often a git commit or a SHA-1 than a key.
_HEX40_RE = re.compile(r"^[0-9a-fA-F]{40}$")
_AWS_SECRET_RE = re.compile(r"^[A-Za-z0-9/+]{40}$")
# Flags and keys whose 40-hex value is a git commit, kept so a command still says which revision it trained.
_GIT_WORDS = frozenset({"revision", "commit", "sha", "sha1", "ref", "hash"})
# Tokenizer fields named "..._token" that hold a special token ("</s>"), never a credential.
_SPECIAL_TOKEN_WORDS = frozenset({"eos", "bos", "pad", "unk", "sep", "cls", "mask", "special"})
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
    words = re.split(r"[^a-z0-9]+", text.lower())
    for i, word in enumerate(words):
        if word in _SECRET_WORDS and not (word == "token" and i > 0 and words[i - 1] in _SPECIAL_TOKEN_WORDS):
            return True
    return False


def is_secret_env(name: str) -> bool:
    """True when the environment variable ``name`` holds a credential: one of :data:`SECRET_ENV_NAMES` or a name
    ending in one of :data:`SECRET_ENV_SUFFIXES` (case-insensitive).

    Example::

        is_secret_env("HF_TOKEN"), is_secret_env("DATABRICKS_TOKEN"), is_secret_env("TOKENIZERS_PARALLELISM")
        # (True, True, False)
    """
    upper = name.upper()
    return upper in SECRET_ENV_NAMES or upper.endswith(SECRET_ENV_SUFFIXES)


_env_lock = threading.Lock()
_env_cache: tuple[tuple[str, ...], tuple[tuple[str, str], ...]] = ((), ())


_HOST_PATH_RE = re.compile(r"^([A-Za-z0-9.-]+\.[A-Za-z]{2,}(?::\d+)?)/")


def _url_stub(value: str) -> str:
    """What a URL-valued secret (a webhook) becomes: its scheme and host stay, so a message still says where; the
    path, which is the credential of a Slack or Discord webhook, does not."""
    if _URL_RE.fullmatch(value):
        try:
            parts = urlsplit(value)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            return MARK
        return f"{parts.scheme}://{host}{port}/{MARK}" if host else MARK
    bare = _HOST_PATH_RE.match(value)  # "hooks.example.com/hook?token=..." (a URL missing its scheme)
    return f"{bare.group(1)}/{MARK}" if bare else MARK


def _env_replacements(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """``(value, replacement)`` for every secret environment variable now set, longest value first."""
    global _env_cache
    env = os.environ if environ is None else environ
    values = tuple(sorted({v for k, v in env.items() if len(v) >= _MIN_ENV_VALUE and is_secret_env(k)}))
    # Read at every call (a variable set after import is covered); only the sorting and URL parsing are cached.
    cached_key, cached = _env_cache
    if values == cached_key:
        return cached
    pairs = tuple((v, _url_stub(v)) for v in sorted(values, key=len, reverse=True) if v.strip())
    with _env_lock:
        _env_cache = (values, pairs)
    return pairs


def secret_env_values(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of the secret environment variables (:func:`is_secret_env`) set now (or in ``environ``), at
    least 8 characters long, longest first: the exact strings every redaction function replaces.

    Example::

        secret_env_values({"HF_TOKEN": "correcthorsebatterystaple9", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"})
        # ('correcthorsebatterystaple9',)   without an argument: the values in os.environ now
    """
    return tuple(value for value, _stub in _env_replacements(environ))


def _env_values(text: str) -> str:
    for value, stub in _env_replacements():
        if value in text:
            text = text.replace(value, stub)
    return text


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
    url = _env_values(url)
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


def _url_in_text(match: re.Match[str]) -> str:
    # "401 for https://h/services/T0/B0/KEY: Bearer ..." - the sentence's punctuation is not part of the URL (a key
    # segment ending in ":" would not look like a key).
    url = match.group(0)
    core = url.rstrip(".,;:!?)]}")
    return redact_url(core) + url[len(core) :]


def redact_text(text: str) -> str:
    """Free text with URLs (:func:`redact_url`), ``Bearer``/``Basic`` credentials, values of secret-looking
    ``--flag value`` / ``key=value`` / ``key: value`` pairs, token-like words (``hf_...``, ``sk-...``,
    ``ghp_...``, ``xoxb-...``, ``AKIA...``, JWTs) and the values of secret environment variables
    (:func:`secret_env_values`; a URL-valued one keeps its scheme and host) replaced by :data:`MARK`.

    Example::

        redact_text("POST to https://h/x?sig=abc failed, token=s3cr3t")   # '... https://h/x?sig=*** ..., token=***'
    """
    if not isinstance(text, str):
        return text
    # Exact environment values first: shape rules could cut a secret in two and leave a part of it unmatched.
    out = _env_values(text)
    out = _URL_RE.sub(_url_in_text, out)
    out = _BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MARK}", out)
    out = _FLAG_RE.sub(_flag, out)
    out = _KEY_RE.sub(_key, out)
    return _tokens(out)


def _git_name(name: str | None) -> bool:
    if not name:
        return False
    return any(w in _GIT_WORDS for w in re.split(r"[^a-z0-9]+", _CAMEL_RE.sub("_", name).lower()))


def _shaped_secret(value: str, owner: str | None) -> bool:
    """True when a whole argument (or the value of ``owner``) is shaped like a W&B key or an AWS secret key."""
    if _HEX40_RE.match(value):
        return not _git_name(owner)  # --revision <40 hex> is a git commit
    if _AWS_SECRET_RE.match(value):
        return any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return False


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with every secret replaced by :data:`MARK`: the value of a secret-looking flag
    (``--hub_token V``, ``--api-key=V``, ``--wandb_api_key V``, any flag with token/secret/password/key as a word),
    of a ``KEY=VALUE`` argument with such a name (``HF_TOKEN=V``, ``trainer.hub_token=V``), token-like words and
    URL credentials anywhere, the values of secret environment variables, and a whole argument or value shaped like
    a W&B key (40 hex digits; kept after a ``--revision``/``--commit``/``--sha`` flag, where it is a git commit) or
    an AWS secret access key. The flags themselves stay.

    Example::

        redact_argv(["run.py", "--api-key=abc", "HF_TOKEN=x", "--lr", "1e-4"])
        # ['run.py', '--api-key=***', 'HF_TOKEN=***', '--lr', '1e-4']
    """
    out: list[str] = []
    value_next = False
    owner: str | None = None  # the flag the previous argument was, whose value this one may be
    for arg in argv:
        arg = str(arg)
        if value_next and not arg.startswith("--"):
            out.append(MARK)
            value_next = False
            continue
        value_next = False
        previous, owner = owner, None
        if arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit():
            flag, sep, value = arg.partition("=")
            if is_secret_name(flag):
                if sep:
                    out.append(f"{flag}={MARK}")
                else:
                    out.append(arg)
                    value_next = True
                continue
            if sep and _shaped_secret(value, flag):
                out.append(f"{flag}={MARK}")
                continue
            owner = None if sep else flag
        else:
            env = _ENV_ARG_RE.match(arg)
            if env and (is_secret_name(env.group(1)) or _shaped_secret(env.group(2), env.group(1))):
                out.append(f"{env.group(1)}={MARK}")
                continue
            if _shaped_secret(arg, previous):
                out.append(MARK)
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
        # {"token": "</s>", "id": 2} is a tokenizer's special token (checks/tokenizer.py), not a credential: its
        # text is still redacted like any other string, but not replaced whole.
        special = set(value) == {"token", "id"} and isinstance(value.get("id"), int)
        return {
            k: (
                MARK
                if isinstance(k, str) and is_secret_name(k) and v not in (None, "") and not special
                else redact_json(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_json(v) for v in value]
    return value
