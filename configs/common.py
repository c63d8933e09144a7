"""The one parser of `get_config(arg)` arguments (as big_vision's `parse_arg`).

`--config configs/mae/digits.py:runlocal` passes "runlocal" to `get_config`. Every config
file declares what it accepts and parses it here, so an unknown variant or key fails
with the valid choices instead of silently running the default config:

    def get_config(arg=None):
        arg = parse_arg(arg, variants=("finetune", "scratch"), runlocal=False)
        ...  # arg.variant, arg.runlocal

An argument is a comma-separated list of
  key=value   a declared key; the value is converted to the type of its default
              (bool accepts true/false/1/0/yes/no, any case)
  word        a declared variant (same as variant=word), or a declared bool key set
              to True (same as word=True)
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"config argument {key}={text!r}: expected a bool (True/False)")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"config argument {key}={text!r}: expected "
                             f"{type(default).__name__}") from None
    return text


def parse_arg(arg: str | None, *, variants: Sequence[str] = (), **spec: Any) -> ml_collections.ConfigDict:
    """Parses a `get_config` argument strictly.

    Args:
      arg: the text after ':' in `--config file.py:arg` (None or "" for the defaults).
      variants: the named variants of the config; the first is the default. Exposed
        as `.variant` (None where the config declares none).
      **spec: declared keys and their defaults (the default's type is the value's).
    Returns:
      A locked ConfigDict with every declared key (and `variant`).
    Raises:
      ValueError naming the unknown token and the valid variants and keys.
    """
    if "variant" in spec:
        raise TypeError("declare variants with variants=(...), not as a key")
    values: dict[str, Any] = {"variant": variants[0] if variants else None, **spec}
    seen: set[str] = set()

    def choices() -> str:
        parts = []
        if variants:
            parts.append("variants " + ", ".join(variants))
        if spec:
            parts.append("keys " + ", ".join(f"{k} (default {v!r})" for k, v in spec.items()))
        return "; ".join(parts) or "no arguments (use the config file without ':...')"

    for token in (t.strip() for t in (arg or "").split(",")):
        if not token:
            continue
        key, eq, text = token.partition("=")
        key = key.strip()
        if not eq:
            if key in variants:
                key, value = "variant", key
            elif isinstance(spec.get(key), bool):
                value = True
            else:
                raise ValueError(f"unknown config argument {token!r}; valid: {choices()}")
        elif key == "variant" and variants:
            value = text.strip()
            if value not in variants:
                raise ValueError(f"unknown config variant {value!r}; valid: {choices()}")
        elif key in spec:
            value = _convert(key, text.strip(), spec[key])
        else:
            raise ValueError(f"unknown config argument {key!r} (in {token!r}); valid: {choices()}")
        if key in seen:
            raise ValueError(f"config argument {key!r} given twice in {arg!r}")
        seen.add(key)
        values[key] = value
    out = ml_collections.ConfigDict(values)
    out.lock()
    return out
