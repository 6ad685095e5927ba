"""Counting XLA compilations with JAX's own instrumentation.

Every backend compilation (a jit cache miss that reaches XLA, eager ops included) records the
`/jax/core/compile/backend_compile_duration` event with the compiled function's name; a listener on
`jax.monitoring` sees each one. `CompileCounter` collects them, labelled by a phase the caller sets
(e.g. the training step), so a loop can assert that nothing compiles after warm-up:

    with CompileCounter() as cc:
        for step in range(n):
            cc.phase = step
            train_step(...)
    assert cc.count(phases=range(2, n)) == 0, cc.describe()

`CompileCounter(where=True)` also records, per compilation, the innermost caller outside JAX and Flax
(`file:line (function)`), which names the Python line that triggered an unexpected compilation.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import traceback
from collections.abc import Container, Hashable
from typing import Any

from jax import monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"


@dataclasses.dataclass(frozen=True)
class Compilation:
    """One backend compilation: the phase it happened in, the function, its wall time."""

    phase: Hashable
    name: str
    seconds: float
    where: str = ""  # the innermost caller outside JAX (with `CompileCounter(where=True)`)


class CompileCounter:
    """Context manager recording every XLA compilation (and every jaxpr trace) while it is open."""

    def __init__(self, phase: Hashable = None, where: bool = False):
        self.phase = phase
        self.where = where
        self.compilations: list[Compilation] = []
        self.traces: list[Compilation] = []

    def _listener(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event in (BACKEND_COMPILE, TRACE):
            rec = Compilation(self.phase, str(kwargs.get("fun_name", "?")), float(duration_secs),
                              _caller() if self.where else "")
            (self.compilations if event == BACKEND_COMPILE else self.traces).append(rec)

    def __enter__(self) -> CompileCounter:
        monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc: object) -> None:
        monitoring.unregister_event_duration_listener(self._listener)

    def _select(self, phases: Container | None) -> list[Compilation]:
        return [c for c in self.compilations if phases is None or c.phase in phases]

    def count(self, phases: Container | None = None) -> int:
        """Compilations in `phases` (all when None)."""
        return len(self._select(phases))

    def seconds(self, phases: Container | None = None) -> float:
        return sum(c.seconds for c in self._select(phases))

    def by_phase(self) -> dict[Hashable, tuple[int, float]]:
        """phase -> (compilations, seconds), in first-seen order."""
        out: dict[Hashable, list] = {}
        for c in self.compilations:
            e = out.setdefault(c.phase, [0, 0.0])
            e[0] += 1
            e[1] += c.seconds
        return {k: (n, s) for k, (n, s) in out.items()}

    def describe(self, phases: Container | None = None) -> str:
        """`name x count (seconds)` per compiled function, for assertion messages."""
        sel = self._select(phases)
        key = lambda c: f"{c.name} at {c.where}" if c.where else c.name
        counts = collections.Counter(key(c) for c in sel)
        secs = collections.defaultdict(float)
        for c in sel:
            secs[key(c)] += c.seconds
        return ", ".join(f"{n} x{k} ({secs[n]:.2f} s)" for n, k in counts.most_common()) or "none"


_JAX_DIR = os.path.dirname(os.path.dirname(monitoring.__file__))  # site-packages/jax
_HERE = os.path.abspath(__file__)


def _caller() -> str:
    """`file:line (function)` of the innermost stack frame outside JAX, Flax and this module."""
    for frame in reversed(traceback.extract_stack()):
        f = os.path.abspath(frame.filename)
        if f != _HERE and not f.startswith(_JAX_DIR) and f"{os.sep}flax{os.sep}" not in f:
            return f"{os.path.relpath(f)}:{frame.lineno} ({frame.name})"
    return "?"
