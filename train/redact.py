"""Secrets stay out of files: redaction by key and by value, for config.yaml, W&B's config, launch
scripts and the launcher's echo.

- By key: a key whose words (split on ``_ - .`` and case changes) include token, secret, key,
  password, passwd, credential(s), authorization or webhook: ``aws_secret_access_key``,
  ``HF_TOKEN``, ``storage_options.key``, ``Authorization``, ``alert_webhook`` (a Slack webhook URL
  is a credential). ``tokenizer``, ``tokens_per_step`` and ``keep_last`` are not.
- By value, wherever it appears: AWS access key ids (``AKIA…``/``ASIA…``), ``user:pass@`` in URLs,
  and bearer tokens (``Bearer …``).

A launcher must still hand the real value to the job: ``protect_overrides`` swaps each secret
override for an OmegaConf environment reference (``key=${oc.env:MOEFORGE_SECRET_0}``) and returns
the values for the job's environment (sbatch passes the submitter's environment on, torchrun its
own), so the script on disk and the command line hold none of them.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

REDACTED = "<redacted>"
SECRET_WORDS = {"key", "token", "secret", "password", "passwd", "credential", "credentials", "authorization",
                "webhook"}
ENV_PREFIX = "MOEFORGE_SECRET_"

_VALUE_PATTERNS = (
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), REDACTED),  # AWS access key ids
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), REDACTED + "@"),  # user:pass@ in a URL
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 " + REDACTED),  # Authorization: Bearer ...
)


def is_secret_key(name: str) -> bool:
    words = re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", str(name))
    return any(w.lower() in SECRET_WORDS for w in words if w)


def redact_text(text: str) -> str:
    """``text`` with every secret-looking value replaced (keys are not looked at here)."""
    for pattern, repl in _VALUE_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def has_secret_value(text: str) -> bool:
    return redact_text(text) != text


def redact_secrets(obj: Any) -> Any:
    """A copy of a config tree (dicts/lists) with secret keys' values and secret-looking strings
    replaced."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "", {}, []) else redact_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _split(override: str) -> Tuple[str, str, str]:
    """(prefix '+'/'++'/'~', key, value) of a Hydra override (value '' when there is none)."""
    m = re.match(r"^(\+\+|\+|~)?([^=]*)(?:=(.*))?$", override, re.S)
    return (m.group(1) or ""), m.group(2), (m.group(3) or "")


def is_secret_override(override: str) -> bool:
    _, key, value = _split(override)
    return bool(value) and (is_secret_key(key) or has_secret_value(value))


def redact_override(override: str) -> str:
    prefix, key, value = _split(override)
    if not value:
        return override
    return f"{prefix}{key}={REDACTED}" if is_secret_key(key) else f"{prefix}{key}={redact_text(value)}"


def redact_command(args: Sequence[str]) -> List[str]:
    """A command line fit to print: each ``key=value`` argument redacted as an override."""
    return [redact_override(a) if "=" in a and not a.startswith("-") else redact_text(a) for a in args]


def protect_overrides(overrides: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """(overrides with each secret one as ``key=${oc.env:MOEFORGE_SECRET_<i>}``,
    {variable: value} for the job's environment)."""
    safe, env = [], {}
    for o in overrides:
        if not is_secret_override(o):
            safe.append(o)
            continue
        prefix, key, value = _split(o)
        var = f"{ENV_PREFIX}{len(env)}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # the quotes were Hydra's, not part of the value
        env[var] = value
        # A list or mapping is parsed back (oc.decode, quoted: Hydra's grammar takes a nested
        # interpolation only in a quoted value); a scalar stays a string that the typed key converts.
        ref = f"'${{oc.decode:${{oc.env:{var}}}}}'" if value[:1] in "[{" else f"${{oc.env:{var}}}"
        safe.append(f"{prefix}{key}={ref}")
    return safe, env
