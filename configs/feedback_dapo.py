r"""Feedback-guided DAPO on the simulated customer-service world (the default job).

  python -m launch.train --config=configs/feedback_dapo.py --workdir=runs/feedback_dapo

Variants (comma separated after a colon):
  smoke         shrink everything so a run takes seconds (used by the tests)
  model=NAME    a ctu.models preset: tiny (default), qwen2p5_0p5b, qwen3_0p6b, ...
  seed=N        the run's seed

Any key below can be overridden with --config.KEY=VALUE, e.g.
--config.algorithm.feedback_guidance.mix=0.5.

Sized for the 20-minute budget on 2 CPU cores: 14 min 35 s measured on seed 0, idle
machine (tokenizer and demonstrations 11 s, copy-and-recall task, 1,000-step warm start
and probe 10 min 52 s, then 12 RL steps with 4 evaluations, 3 min 32 s); docs/results.md
has the runs.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False, model="tiny", seed=0)
    config = ml_collections.ConfigDict()
    config.seed = arg.seed
    config.backend = "cpu"  # cpu | gpu | tpu
    config.distributed = False  # jax.distributed.initialize() for multi-host runs

    # Data
    config.data = ml_collections.ConfigDict()
    config.data.dir = "data/world"  # RL and the warm start use its train split

    # Model
    config.model = ml_collections.ConfigDict()
    config.model.preset = arg.model
    config.model.init = "scratch"  # scratch | hf:PATH (a Hugging Face folder)
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    # Add the embeddings of this many preceding tokens to each token's, through learned
    # gates (ModelConfig.smear): a model trained from scratch copies by content far
    # sooner; 3 reaches the word that names a value across the space token before it
    # ("call", " ", "Ironwood"), 6 the department a phone number's area code follows
    # ("Fraud", ":", " +", "1", "-", "800"; docs/results.md sections 1 and 2). For a
    # preset trained from scratch only (HF has no such gates): 0 for the other presets,
    # and set 0 with model.init=hf:PATH.
    scratch = arg.model == "tiny"
    config.model.smear = 6 if scratch else 0
    # A HF tokenizer folder; "": a model.init=hf:PATH checkpoint's own, else a BPE
    # tokenizer built from the world into WORKDIR/tokenizer.
    config.model.tokenizer = ""
    config.model.tokenizer_vocab_size = 2048
    config.model.tokenizer_episodes = 200  # scripted episodes added to its training text
    config.model.tokenizer_max_digits = 3  # numbers split into pieces of up to 3 digits

    # Mesh (-1: the remaining devices)
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    # Warm start: supervised fine-tuning on the heuristic agent's demonstrations,
    # some of which read a <previous_attempts> block and act on it.
    config.warm_start = ml_collections.ConfigDict()
    config.warm_start.enable = True
    # 1,000 with demonstrations that reason first (thoughts, below); 1,200 took the job
    # past 20 minutes on 2 cores (20 min 44 s). docs/results.md section 2.
    config.warm_start.steps = 1000
    config.warm_start.batch_size = 4  # more, smaller steps learn more per CPU second
    config.warm_start.learning_rate = 2e-3
    config.warm_start.warmup_steps = 30
    config.warm_start.num_tasks = 0  # train tasks demonstrated; 0 = all
    config.warm_start.demos_per_task = 1
    # Fraction of tasks whose demonstrations include a second attempt that reads a
    # <previous_attempts> block of 1 to feedback_demo_attempts earlier failures (the
    # heuristic's own, random-policy attempts before it).
    config.warm_start.feedback_demo_fraction = 0.5
    config.warm_start.feedback_demo_attempts = 3
    config.warm_start.max_len = 2560  # demonstrations longer than this are left out
    # Batches pad to a multiple of this: 16 lengths (compilations) in 400 steps at
    # 128, 6 at 512. On a GPU a compilation of the tiny model's update takes ~20 s
    # (docs/results.md section 4), so use 512 there; on the CPU padding costs more.
    config.warm_start.length_bucket = 128
    # Weight of language modelling on the environment's text (user, tools) beside the
    # agent's turns: a from-scratch model learns to read and copy from it.
    config.warm_start.context_loss_weight = 1.0
    # Updates on a generic copy task (a random span repeated at a random place) before
    # the demonstrations, so copying names and numbers can be learned from them (the
    # copying circuit forms after ~600 updates; a pretrained model has it already).
    config.warm_start.induction_steps = 800 if scratch else 0
    config.warm_start.induction_learning_rate = 3e-3
    # copy: a span repeated; recall: a value found by the key a few tokens before the
    # separators all lines share, as a phone number after "Fraud: +1-" in a directory;
    # copy+recall: half the rows each (ctu.analysis.induction). With copy+recall the
    # warm start copies the right phone number more often (56-63% against 49-51%) and
    # succeeds on 14/16/22% of validation tasks against 8/10/4% (docs/results.md
    # section 2, fifth subsection); the same time.
    config.warm_start.induction_task = "copy+recall"
    # Loss weight of the demonstrated turns by the tool they call (respond: a message to
    # the user), within a weighted token mean.
    config.warm_start.turn_weights = ml_collections.ConfigDict(
        {"search_company": 1.0, "auth_info_form": 1.0, "make_phone_call": 1.0, "respond": 1.0}
    )
    # Demonstrations reason before they act, in a <think> block the tool-call parser
    # drops: the user's requests and the department that handles each before the
    # first form, the department and its number before a call (agents.Heuristic). The
    # form then follows from words a few tokens back, not from the request 400 tokens
    # earlier (docs/results.md section 2, sixth subsection).
    config.warm_start.thoughts = True
    # A demonstration that reads a critique cites it in its first form's thought, in the
    # critique's words: the right department when it names one, the task's fields when
    # it lists them ("Feedback: all needed fields (name, phone).") (agents.Heuristic
    # cite_feedback). Off: with critiques that show the form's JSON the retries copy the
    # form without it, and on three seeds the warm starts succeeded on 10 / 10 / 24% of
    # validation tasks with it against 16 / 12 / 34% without, and their guided rollouts
    # on 10% against 16% (docs/results.md section 2, third subsection). On, the longest
    # demonstrated turn is 128 tokens.
    config.warm_start.feedback_thoughts = False
    # A call's thought ends with the fields it passes ("... Fields: name, phone."; the
    # longest demonstrated turn is then 138 tokens: raise rollout.max_new_tokens to 140).
    # Off: on seed 0 its warm start succeeded on 10% of validation tasks against 20%,
    # its first form right 20% of the time against 55% (docs/results.md section 2,
    # second subsection).
    config.warm_start.call_fields_thoughts = False

    # Rollout
    config.rollout = ml_collections.ConfigDict()
    # jax: the in-process sampler. vllm: a vLLM engine on the GPU (its model folder is
    # the workdir's vllm_policy/, rewritten after every update); it runs the Hugging Face
    # architecture, so it needs model.smear=0, e.g. a model.init=hf:PATH checkpoint.
    config.rollout.engine = "jax"  # jax | vllm
    # vLLM's share of GPU memory (its gpu_memory_utilization); JAX is then limited to
    # the rest less 0.05 (XLA_PYTHON_CLIENT_MEM_FRACTION) unless that variable is set.
    config.rollout.vllm_gpu_memory_utilization = 0.4
    # CPU backend: XLA CPU devices the in-process sampler splits its rows over, one
    # decode loop each (a tiny model's decode step runs on one core per device;
    # docs/results.md section 4). The learner keeps the first device. 0: one per core;
    # 1: sampler and learner share config.mesh.
    config.rollout.cpu_devices = 0
    config.rollout.tasks_per_step = 4
    config.rollout.group_size = 8
    config.rollout.max_turns = 10
    # Per assistant turn. The heuristic's longest turn on the shipped world is 116 tokens
    # with the world tokenizer (a call with six auth values after its thought; 128 with
    # warm_start.feedback_thoughts, a first form whose thought cites a critique); at 80,
    # 41 of 100 val tasks needed a longer turn than the policy could write
    # (tests/test_train.py). A higher limit only lets a derailed turn run on
    # (docs/results.md section 2). 132 fits either (this session's runs used it).
    config.rollout.max_new_tokens = 132
    # Per episode, prompt included; the prompt alone (system turn with the tool
    # schemas, the user's request) is ~860 tokens with the world tokenizer.
    config.rollout.max_total_tokens = 2048
    config.rollout.temperature = 1.0
    # Nucleus sampling over the 50 likeliest tokens: the warm start's tail at T=1 breaks
    # 42% of its turns (26% with these; docs/results.md section 2). The learner recomputes
    # behaviour log-probs under the whole distribution, as verl and TRL do (guided rows
    # with training_context "original" keep the sampler's, the filtered distribution's).
    config.rollout.top_p = 0.8
    config.rollout.top_k = 50

    # Algorithm
    config.algorithm = ml_collections.ConfigDict()
    config.algorithm.loss = "dapo"
    config.algorithm.eps_low = 0.2
    config.algorithm.eps_high = 0.28
    config.algorithm.dual_clip = 0.0  # 0 turns dual-clip off; else c > 1
    config.algorithm.kl_coef = 0.0
    config.algorithm.advantage = "grpo"  # grpo (mean/std) | dr_grpo (mean only) | rloo
    # What the learner maximises: the reward function's partial-credit score (SPEC), or
    # success alone (1 for a completed task, else 0; dynamic sampling then keeps groups
    # whose successes differ). Baseline, three seeds at lr 3e-4: 12.7 +- 7.6% validation
    # success with success alone, 12.7 +- 2.3% with the score (docs/results.md section
    # 2, first subsection).
    config.algorithm.reward = "score"  # score | success
    # Per-rollout or per-turn advantages. episode: every token of a rollout carries its
    # rollout's advantage. progress: a turn's tokens carry the return still to come when
    # the turn began (the reward less the score so far), against the group's at the
    # same turn: the same expected gradient, less noise (ctu/rl/credit.py; needs
    # reward=score). On the warm starts progress takes 1.6-2.6x of the noise out of a
    # group's gradient, but the baseline arm ends no higher: 18.7 +- 3.1% validation
    # success at 3e-5 against 20.7 +- 2.3% with episode, 5.3 +- 5.0% against 12.7 +- 2.3%
    # at 3e-4 (docs/results.md section 2, first subsection).
    config.algorithm.credit = "episode"  # episode | progress
    # progress: the weight of what later turns gain in a turn's credit (GAE's lambda,
    # with the score so far as the value). 1: the reward's gradient; below 1 a turn is
    # judged more by its own gain, a shaped objective. At the seed-0 baseline warm start
    # 0.5 and 0 cut the noise further but the signal more: B_noise 283 and 599 groups
    # against 142 at 1 (docs/results.md section 2, first subsection).
    config.algorithm.credit_lambda = 1.0
    # A factor on the advantages of each kind of turn (the tool it called; respond: a
    # message to the user; malformed: no usable call; cut: stopped by the token limit).
    # 1 everywhere is the reward's gradient; 0 leaves a kind's tokens out of the update
    # (they still count in DAPO's token mean). Malformed turns are 14-18% of the sampled
    # tokens and half of the gradient's noise at the warm starts; weighted 0 the noise
    # scale halves (182 -> 87 groups), but nothing then teaches the policy to stop
    # writing them: 17-28% of turns malformed after 12 steps at 3e-4, against 4-12%.
    config.algorithm.turn_weights = ml_collections.ConfigDict(
        {
            "search_company": 1.0,
            "auth_info_form": 1.0,
            "make_phone_call": 1.0,
            "respond": 1.0,
            "malformed": 1.0,
            "cut": 1.0,
        }
    )
    # The distribution the learner trains. full: the whole softmax, as verl and TRL do.
    # sampled: the one the rollouts were drawn from (rollout.top_k / top_p), each
    # token's support fixed at the update's start. Trained on the whole softmax, tokens
    # the sampler never draws take the probability negative advantages push out.
    config.algorithm.learner_support = "full"  # full | sampled

    config.algorithm.dynamic_sampling = ml_collections.ConfigDict()
    config.algorithm.dynamic_sampling.enable = True
    config.algorithm.dynamic_sampling.max_rounds = 1

    config.algorithm.overlong = ml_collections.ConfigDict()
    config.algorithm.overlong.enable = True
    config.algorithm.overlong.max_length = 640  # generated tokens per episode
    config.algorithm.overlong.cache_length = 128
    config.algorithm.overlong.mask_truncated = False

    fg = config.algorithm.feedback_guidance = ml_collections.ConfigDict()
    fg.enable = True
    fg.start_rollout = 2
    fg.accumulation_mode = "all"  # all | last | summary
    fg.max_feedback_tokens = 500
    # Rewrite failed rollouts' critiques with an LLM behind an OpenAI-compatible endpoint
    # (e.g. `vllm serve MODEL` -> http://localhost:8000/v1), cached in WORKDIR/feedback_cache;
    # the rule-based critique stays when a request fails. The key, if any, is read from
    # the environment variable llm_api_key_env names.
    fg.use_llm_enhancement = False
    fg.llm_base_url = ""
    fg.llm_model = ""
    fg.llm_api_key_env = ""
    fg.llm_timeout_s = 30.0
    fg.mix = 1.0  # fraction of groups that get feedback
    # augmented | original (importance-corrected). augmented: on three seeds original
    # with the shaped objective ended at 10.0 +- 3.5% validation success against
    # 10.7 +- 5.0%, with a lower score (docs/results.md section 2, second subsection).
    fg.training_context = "augmented"
    fg.guided_objective = "clip"  # clip | shaped (r / (r + gamma)), for "original"
    fg.shaping_gamma = 0.1
    fg.wave_size = 4  # rollouts per wave after the first; 1 = strictly sequential

    # Optimizer
    config.optimizer = ml_collections.ConfigDict()
    # An update of 4 groups is almost all noise: the gradient noise scale at the warm
    # start is ~180 groups without feedback and ~900 with it (`python -m
    # launch.grad_noise`), and Adam moves the weights by about the learning rate either
    # way. On three seeds, 12 steps at 3e-4 lost 6-14 points of validation success in
    # both arms; at 3e-5 they held it (18.0 +- 2.0% with feedback, 20.7 +- 2.3% without,
    # from 20%; docs/results.md section 2, first subsection). Over 48 steps on an H100
    # (192 groups) 1e-4 kept improving where 3e-4 fell (section 2, eighth subsection).
    config.optimizer.learning_rate = 3e-5
    config.optimizer.warmup_steps = 5
    config.optimizer.weight_decay = 0.0
    config.optimizer.max_grad_norm = 1.0
    # A regular expression over parameter paths ("embed", "layers.0.attn.q_proj",
    # "final_norm.scale"): only the parameters it matches are trained. "" = all.
    config.optimizer.trainable = ""
    config.optimizer.ppo_epochs = 1
    config.optimizer.num_mini_batches = 2
    config.optimizer.num_micro_batches = 1
    # Rollout batches pad to a multiple of this (a compilation per length); as the warm
    # start's bucket: 512 on a GPU.
    config.optimizer.length_bucket = 128

    # Schedule, evaluation, checkpoints, logging
    config.total_steps = 12
    config.eval_every = 4
    config.eval = ml_collections.ConfigDict()
    config.eval.split = "val"  # train | val | test
    config.eval.num_tasks = 50
    config.checkpoint_every = 4
    config.max_to_keep = 3
    config.log_examples_every = 4
    config.debug_conversations = False  # full conversation logs in WORKDIR/conversations

    if arg.smoke:
        config.model.tokenizer_episodes = 0
        config.warm_start.steps = 2
        config.warm_start.induction_steps = 3
        config.warm_start.batch_size = 2
        config.warm_start.num_tasks = 4
        config.warm_start.max_len = 4096
        config.rollout.tasks_per_step = 2
        config.rollout.group_size = 4
        config.rollout.max_turns = 3
        config.rollout.max_new_tokens = 16
        config.rollout.max_total_tokens = 1280
        config.algorithm.overlong.max_length = 64
        config.algorithm.overlong.cache_length = 16
        config.algorithm.dynamic_sampling.max_rounds = 1
        config.total_steps = 2
        config.eval_every = 2
        config.eval.num_tasks = 4
        config.checkpoint_every = 1
        config.log_examples_every = 1
    return config
