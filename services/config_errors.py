"""One line for a configuration mistake: which key, from where, and what is wrong (never a traceback).

``load_settings`` turns what pydantic, pydantic-settings and YAML raise into ``ConfigError``; ``rheo`` prints its
message and exits 2, for every subcommand and service.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError

ENV_PREFIX = "RHEO_"


class ConfigError(ValueError):
    """A configuration mistake; ``str()`` is one line naming the key and the problem."""


def env_name(key: str) -> str:
    """``gateway.api_tokens`` → ``RHEO_GATEWAY__API_TOKENS``."""
    return ENV_PREFIX + "__".join(key.split(".")).upper()


def _source(key: str, env: Mapping[str, str]) -> str:
    name = env_name(key)
    if name in env:
        return f"{name}={env[name][:60]!r}"
    return f"{key} in RHEO_CONFIG {env['RHEO_CONFIG']}" if env.get("RHEO_CONFIG") else key


def _problem(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (see `rheo config --keys`)"
    return str(error["msg"]).replace("Input should be", "should be")


def explain(exc: Exception, structured: Iterable[str], env: Mapping[str, str] | None = None) -> str:
    """The one line for ``exc``; ``structured``: the keys whose values are JSON (lists, mappings)."""
    env = os.environ if env is None else env
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        first = errors[0]
        key = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"config error: {_source(key, env)}: {_problem(first)}{more}"
    if isinstance(exc, SettingsError):
        for key in structured:
            value = env.get(env_name(key))
            if value is None:
                continue
            try:
                json.loads(value)
            except ValueError:
                return (f"config error: {env_name(key)}={value[:60]!r}: not JSON; a list or mapping is written as "
                        f"JSON, e.g. {env_name(key)}='[\"a\", \"b\"]'")
        return f"config error: {str(exc).splitlines()[0]}"
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"config error: RHEO_CONFIG {env.get('RHEO_CONFIG', '')}{where}: not valid YAML: {problem}"
    return f"config error: {str(exc).splitlines()[0]}"
