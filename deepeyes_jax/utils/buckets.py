"""Padded sizes, shared by the sampler and the training batch: every distinct array shape is a program
to compile, so lengths and window and image counts are rounded up to a few sizes. Powers of two compile
few programs but pad up to 2x; multiples of a step pad less and compile more (BENCHMARKS.md, GRPO
update on Mini-V* rollouts)."""

from __future__ import annotations


def pow2(n: int, minimum: int) -> int:
    """The smallest power-of-two multiple of `minimum` (at least 1) that is >= n."""
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b


def check_multiple(multiple: int, name: str) -> None:
    """A padding setting (`bucket_length`'s `multiple`) must be 0 (powers of two) or positive."""
    if multiple < 0:
        raise ValueError(f"{name}={multiple}; use 0 (powers of two) or a positive multiple")


def bucket_length(n: int, minimum: int, multiple: int = 0, name: str = "length_multiple") -> int:
    """The padded size for `n`: `pow2(n, minimum)`, or with `multiple` > 0 the next multiple of it (at
    least `minimum`). `name` is the setting `multiple` came from, for the error."""
    check_multiple(multiple, name)
    if not multiple:
        return pow2(n, minimum)
    return max(minimum, -(-n // multiple) * multiple)
