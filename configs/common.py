"""Helpers shared by the config files: the variant argument string.

`--config=configs/feedback_dapo.py:smoke,model=qwen3_0p6b` calls
`get_config("smoke,model=qwen3_0p6b")`; `parse_arg` turns that into a
ConfigDict of the variant's settings, refusing names the config does not know.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "a,b=3,c=x" against `defaults`: a bare name sets a bool to True.

    Values take the type of their default (bool, int, float or str).
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(
                f"unknown config variant {name!r} in {arg!r}; this config takes "
                f"{', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if not value:
            if not isinstance(default, bool):
                raise ValueError(f"config variant {name!r} needs a value: {name}=...")
            result[name] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config variant {name}={value!r}: use true or false")
            result[name] = value.lower() in ("true", "1")
        else:
            try:
                result[name] = type(default)(value)
            except ValueError:
                raise ValueError(
                    f"config variant {name}={value!r}: expected a {type(default).__name__}"
                ) from None
    return result
