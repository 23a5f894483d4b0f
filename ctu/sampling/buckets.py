"""Shape buckets: a run compiles once per bucket, not once per length."""


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def batch_bucket(batch_size: int) -> int:
    """Rows allocated for a session of `batch_size` rows (a power of two)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return next_power_of_two(batch_size)


def append_bucket(length: int, *, minimum: int, maximum: int, step: int | None = None) -> int:
    """Padded length of an append chunk of `length` tokens.

    Powers of two from `minimum` up to `step`, then multiples of `step` (the prefill
    chunk: a longer append is fed `step` columns at a time, so a finer bucket only drops
    whole pieces of padding: a 1,300-token prompt pads to 1,536, not 2,048), all capped at
    `maximum` (the session's cache length). A session compiles its append step at most
    log2(step / minimum) + maximum / step + 2 times.
    """
    if length < 0:
        raise ValueError(f"append length must be >= 0, got {length}.")
    bucket = next_power_of_two(max(length, minimum))
    if step is not None and bucket > step:
        bucket = -(-length // step) * step
    return min(bucket, maximum)
