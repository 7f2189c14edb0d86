"""`train.precision`: the Keras dtype policy a model is built under."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "auto")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags the CPU reports (x86 `flags`, Arm `Features`); empty
    where /proc/cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def visible_gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def resolve_precision(name: str, cpu_flags: set[str] | None = None,
                      gpus: int | None = None) -> str:
    """The Keras policy name for `train.precision`: "auto" is mixed_float16 with a GPU,
    mixed_bfloat16 on a CPU with bfloat16 instructions, else float32; any other name is
    itself. `cpu_flags` and `gpus` default to this machine's."""
    if name not in PRECISIONS:
        raise ValueError(f"train.precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if (visible_gpus() if gpus is None else gpus) > 0:
        return "mixed_float16"
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    return "mixed_bfloat16" if flags & BF16_CPU_FLAGS else "float32"


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[str]:
    """Keras's global dtype policy set to `resolve_precision(name)` for the block, the
    previous one restored after; yields the policy name. Keras keeps the policy per
    thread, and a layer takes it when created: build the model (and compile it, so that
    mixed_float16 gets its loss scaling) inside the block."""
    import keras

    resolved = resolve_precision(name)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)
