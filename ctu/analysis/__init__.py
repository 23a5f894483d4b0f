"""Evaluating trained policies and comparing runs.

- policy_loading.py: `checkpoint:WORKDIR[@STEP]` and `hf:PATH` policies rebuilt from a
  workdir (config.json, tokenizer, the checkpoint's model item) for greedy evaluation.
- model_eval.py: `launch.evaluate` for every policy (scripted or model); the JSON keys.
- runs.py: a run's workdir read back (metrics merged by step, config, eval JSONs);
  samples/tasks counted, thresholds reached, seeds aggregated.
- copy_probe.py: the teacher-forced probe of whether a policy copies tool-call
  arguments (company name, phone number, auth values) from its context, and which of
  the heuristic's actions it would take exactly.
- plots.py: the matplotlib figures; compare.py: `launch.compare` (plots + summary.md).
"""
