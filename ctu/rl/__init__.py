"""RL: policy losses, group advantages, dynamic sampling, overlong shaping, train step.

Submodules are imported explicitly (`from ctu.rl import losses`) so that the
pure-Python parts (dynamic sampling) do not pull in JAX.
"""
