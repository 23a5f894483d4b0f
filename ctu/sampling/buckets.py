"""Shape buckets: a run compiles once per bucket, not once per length."""


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def batch_bucket(batch_size: int) -> int:
    """Rows allocated for a session of `batch_size` rows (a power of two)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return next_power_of_two(batch_size)


def append_bucket(length: int, *, minimum: int, maximum: int) -> int:
    """Padded length of an append chunk of `length` tokens.

    Powers of two from `minimum`, capped at `maximum` (the session's cache length), so a
    session compiles its append step at most log2(maximum / minimum) + 2 times.
    """
    if length < 0:
        raise ValueError(f"append length must be >= 0, got {length}.")
    return min(next_power_of_two(max(length, minimum)), maximum)
