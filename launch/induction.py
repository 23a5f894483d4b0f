r"""How many updates does a model preset need to learn copying by content?

  python -m launch.induction --model=tiny --seeds=0,1,2 --out=induction.json
  python -m launch.induction --model=tiny --qk_norm=off --out=induction_no_qk_norm.json
  python -m launch.induction --model=tiny --smear=1 --learning_rate=3e-3 --out=smear.json

Trains fresh models on the variable-offset copy task of `ctu.analysis.induction` (a
random span repeated at a random place, so only content says where it came from) and
writes each seed's loss curve and the first logged step whose loss is below half of
chance. `--qk_norm=off` removes the q/k RMSNorm of a Qwen3 preset (Qwen2-style
attention) to measure what it costs; `--smear=N` adds the N previous tokens' embeddings
to each token's (`ModelConfig.smear`).
"""

import dataclasses
import json

from absl import app, flags

from ctu.backend import add_cpu_xla_flags

_MODEL = flags.DEFINE_string("model", "tiny", "A ctu.models preset.")
_QK_NORM = flags.DEFINE_enum("qk_norm", "preset", ["preset", "on", "off"], "q/k RMSNorm.")
_SMEAR = flags.DEFINE_integer("smear", 0, "ModelConfig.smear: preceding embeddings added.")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", None, "The model's vocabulary (default: the preset's; grown to fit the task)."
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, one fresh model each.")
_VOCAB = flags.DEFINE_integer("vocab", 64, "Distinct random tokens.")
_LENGTH = flags.DEFINE_integer("length", 64, "Sequence length.")
_SPAN = flags.DEFINE_integer("span", 10, "Length of the repeated span.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per update.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Updates per seed.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "AdamW's peak learning rate.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    add_cpu_xla_flags()  # before any backend opens
    from ctu.analysis import induction
    from ctu.models import ModelConfig
    from ctu.world.evaluation import check_output_path, write_json_atomic

    try:
        check_output_path(_OUT.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    model_config = ModelConfig.preset(_MODEL.value)
    if _QK_NORM.value != "preset":
        model_config = dataclasses.replace(model_config, qk_norm=_QK_NORM.value == "on")
    model_config = dataclasses.replace(model_config, smear=_SMEAR.value)
    if _VOCAB_SIZE.value is not None:
        model_config = dataclasses.replace(model_config, vocab_size=_VOCAB_SIZE.value)
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from None
    results = {"model": dataclasses.asdict(model_config), "runs": []}
    for seed in seeds:
        try:
            probe = induction.ProbeConfig(
                vocab=_VOCAB.value,
                length=_LENGTH.value,
                span=_SPAN.value,
                batch=_BATCH.value,
                steps=_STEPS.value,
                learning_rate=_LR.value,
                seed=seed,
            )
        except ValueError as error:
            raise app.UsageError(str(error)) from None
        print(f"seed {seed}:")
        run = induction.run_probe(model_config, probe)
        results["runs"].append({"probe": dataclasses.asdict(probe)} | run)
        print(f"seed {seed}: steps to copy {run['steps_to_copy']}, {run['seconds']:.0f} s")
    write_json_atomic(_OUT.value, results)
    print(json.dumps({r["probe"]["seed"]: r["steps_to_copy"] for r in results["runs"]}))


if __name__ == "__main__":
    app.run(main)
