"""Argument checks shared by every wing: one place that says what a valid int, number or byte count is.

Each check returns the value it accepted and raises a typed :class:`~djinn_core.errors.DjinnError` (by default
:class:`~djinn_core.errors.ConfigError`) whose message names the argument, the rule and the value. ``bool`` is never
accepted as a number, although Python treats it as an int.
"""

from __future__ import annotations

import math
from typing import Any

from djinn_core.errors import ConfigError, DjinnError


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = 0, maximum: int | None = None, *,
              error: type[DjinnError] = ConfigError) -> int:
    """``value`` if it is an int within ``[minimum, maximum]`` (either bound may be None), else ``error``."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f"{' and' if lo else ''} <= {maximum}"
        raise error(f"{name} must be an int{lo}{hi}, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float | None = 0.0, maximum: float | None = None, *,
                 strict_minimum: bool = False, error: type[DjinnError] = ConfigError) -> float:
    """``value`` if it is a finite int or float within bounds (``strict_minimum``: above ``minimum``), else
    ``error``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        lo = "" if minimum is None else f" {'>' if strict_minimum else '>='} {minimum:g}"
        hi = "" if maximum is None else f" <= {maximum:g}"
        raise error(f"{name} must be a finite number{lo}{hi}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, minimum: int | None = 0, maximum: int | None = None, *,
                       error: type[DjinnError] = ConfigError) -> int | None:
    """None, or an int as :func:`check_int` accepts it."""
    return None if value is None else check_int(name, value, minimum, maximum, error=error)


def check_device(device: Any) -> "torch.device":
    """``device`` as a :class:`torch.device`; :class:`~djinn_core.errors.DeviceUnavailable` when it names a CUDA
    device this machine does not have, :class:`~djinn_core.errors.ConfigError` when it is no device at all."""
    import torch

    from djinn_core.errors import DeviceUnavailable

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"not a device: {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device!r} asked for, but this machine has no CUDA GPU "
                                    "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {device!r} asked for, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
