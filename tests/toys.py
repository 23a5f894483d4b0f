"""Shared toy fixtures for tests: tiny world, tiny model, tiny tokenizer.

Each area adds its own functions here; never rewrite another area's.
"""

import contextlib
import http.server
import json
import threading

# --- Text layer (ctu/text): tool schemas and a tiny tokenizer --------------------------


def text_tool_schemas() -> list[dict]:
    """A copy of the world's three tool schemas (ctu/world/tools.py), for text-layer tests."""
    fields = [
        "name",
        "account_number",
        "last_4_ssn",
        "date_of_birth",
        "address",
        "phone",
        "credit_card_last4",
    ]

    def schema(name, description, properties, required):
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": required,
                    "additionalProperties": False,
                },
            },
        }

    return [
        schema(
            "search_company",
            "Look up a company by name; returns its departments and phone numbers.",
            {"company_name": {"type": "string"}},
            ["company_name"],
        ),
        schema(
            "auth_info_form",
            "Ask the user once for the authentication fields the call will need.",
            {"fields": {"type": "array", "items": {"type": "string", "enum": fields}}},
            ["fields"],
        ),
        schema(
            "make_phone_call",
            "Call a department's phone number with the user's authentication details.",
            {"phone_number": {"type": "string"}, "auth_info": {"type": "object"}},
            ["phone_number", "auth_info"],
        ),
    ]


def text_training_texts() -> list[str]:
    """A small corpus in the world's register, to train the tiny tokenizer."""
    import json

    texts = [
        "Acme Bank Billing Department handles payment disputes and late fees.",
        "Northwind Telecom Technical Support fixes internet outages and router problems.",
        "Globex Insurance Fraud team investigates suspicious claims. Call 555-0142.",
        "Hi, I need to dispute a charge on my credit card with Acme Bank.",
        "My name is Jane Doe, account number 12345678, date of birth 1990-04-12.",
        "Please call the billing department first, then customer service.",
        "The user does not have their last 4 SSN. Authentication failed: missing field.",
        "I'll look up the company first. Let me search for it.",
    ]
    texts += [json.dumps(tool) for tool in text_tool_schemas()]
    # Chat scaffolding, so merges such as "\n\n" and "assistant" exist as in real vocabularies.
    texts += [
        "<|im_start|>user\nHello there.\n\n  Thanks!<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "search_company", "arguments": {"company_name": "Acme"}}\n'
        "</tool_call><|im_end|>\n\n\t\t hi hi\n\n\n\n"
    ]
    return texts * 4


def tiny_tokenizer_dir(vocab_size: int = 1024) -> str:
    """A directory holding the tiny BPE tokenizer, built once per test process."""
    import atexit
    import shutil
    import tempfile

    from ctu.text import build_tokenizer

    cache = _TINY_TOKENIZER_DIRS
    if vocab_size not in cache:
        out_dir = tempfile.mkdtemp(prefix="ctu_tiny_tokenizer_")
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        build_tokenizer(text_training_texts(), out_dir, vocab_size=vocab_size)
        cache[vocab_size] = out_dir
    return cache[vocab_size]


def tiny_tokenizer(vocab_size: int = 1024):
    """The tiny tokenizer, loaded with transformers.AutoTokenizer."""
    from ctu.text import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir(vocab_size))


_TINY_TOKENIZER_DIRS: dict[int, str] = {}


# --- Tiny model (ctu/models) -------------------------------------------------------------


def tiny_model_config(vocab_size: int = 128, **overrides):
    """The `tiny` ModelConfig preset with a small vocabulary."""
    from ctu.models import ModelConfig

    return ModelConfig.preset("tiny", vocab_size=vocab_size, **overrides)


def tiny_model(config=None, *, seed: int = 0, weight_scale: float = 1.0):
    """A randomly initialised `Qwen` on the tiny preset.

    `weight_scale` multiplies every matrix so logits and attention are far from uniform,
    which makes reference comparisons discriminative.
    """
    from flax import nnx

    from ctu.models import Qwen

    model = Qwen(config or tiny_model_config(), rngs=nnx.Rngs(seed))
    if weight_scale != 1.0:
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Param) and node.ndim >= 2:
                node.set_value(node.get_value() * weight_scale)
    return model


def tiny_hf_checkpoint(
    path,
    family: str = "qwen3",
    *,
    vocab_size: int = 97,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 96,
    tie_word_embeddings: bool = True,
    rope_theta: float = 5000.0,
    max_shard_size: str | None = None,
    seed: int = 0,
):
    """Saves a tiny random transformers Qwen2/Qwen3 model to `path`; returns the torch model.

    Weights are drawn wider than the HF default and norms/biases are perturbed from their
    initial constants, so every parameter matters to the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields))
    else:
        fields["head_dim"] = head_dim or hidden_size // num_heads
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


# --- World (ctu/world): the shipped world and a perfect policy ---------------------------

WORLD_DIR = __import__("os").path.join(
    __import__("os").path.dirname(__import__("os").path.dirname(__file__)), "data", "world"
)


@__import__("functools").cache
def shipped_world():
    """The seed-0 world in data/world, loaded once per test process."""
    from ctu.world.data import load_world

    return load_world(WORLD_DIR)


def tiny_world(tmp_path, seed: int = 0) -> str:
    """Writes a freshly generated world under tmp_path; returns its directory."""
    from ctu.world import generate

    out = str(tmp_path / f"world_{seed}")
    generate.write_world(out, seed)
    return out


def perfect_actions(world, task, observation_after_form: str = ""):
    """The minimal perfect action list of a task (the oracle's plan).

    Pass the form's observation: a needs_clarification user withholds a field
    until the agent explains it, which costs one `respond`.
    """
    from ctu.world.data import auth_set_for
    from ctu.world.env import Action

    company = world.companies[task.company_id]
    user = world.users[task.user_id]
    yield Action("search_company", {"company_name": company.name})
    observation = yield Action("auth_info_form", {"fields": list(task.required_auth_fields)})
    if "What do you mean" in (observation or observation_after_form):
        yield Action("respond", {"content": "It is the detail the company uses to verify you."})
    for request in task.requests:
        department = world.departments[request.department_id]
        auth = {f: user.values[f] for f in auth_set_for(department, user)}
        yield Action(
            "make_phone_call", {"phone_number": department.phone_number, "auth_info": auth}
        )
    yield Action("respond", {"content": "All done: every request has been handled."})


def run_perfect(env, task):
    """Runs perfect_actions in env; returns the last StepResult."""
    env.reset(task.task_id)
    plan = perfect_actions(env.world, task)
    action = next(plan)
    while True:
        result = env.step(action)
        if result.done:
            return result
        try:
            action = plan.send(result.observation)
        except StopIteration:
            return result


# --- Rollouts (ctu/rollout): a scripted engine that plays canned assistant turns ---------


def _turn_text(ids, tokenizer) -> str:
    """What the environment said in an appended chunk (tool results or a user message)."""
    import re

    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.DOTALL)
    if responses:
        return "\n".join(responses)
    users = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return users[-1] if users else text


class ScriptedSession:
    """An EngineSession that 'samples' canned turns, with `ctu.sampling.Session`'s
    bookkeeping: per-row history, the max_len capacity (a row's history holds at most
    max_len + 1 ids: max_len fed plus the pending sampled one), max_new_tokens and stop
    reasons. Every generate call is logged in `calls` as (appends, Generation)."""

    def __init__(self, engine, batch_size: int, max_len: int):
        self.engine = engine
        self.batch_size = batch_size
        self.max_len = max_len
        self.histories = [[] for _ in range(batch_size)]
        self.rows = [None] * batch_size  # per-row turn functions
        self.calls = []

    def generate(self, appends, rng):
        import numpy as np

        from ctu.sampling import LENGTH, STOP, Generation

        del rng
        tokenizer, budget = self.engine.tokenizer, self.engine.sampling.max_new_tokens
        tokens = np.zeros((self.batch_size, budget), np.int32)
        logprobs = np.zeros((self.batch_size, budget), np.float32)
        num = np.zeros(self.batch_size, np.int32)
        reasons = [None] * self.batch_size
        for row, new in enumerate(appends):
            if new is None:
                continue
            history = self.histories[row]
            if len(history) + len(new) > self.max_len:
                reasons[row] = LENGTH
                continue
            history.extend(new)
            if self.rows[row] is None:
                prompt = tokenizer.decode(list(new), skip_special_tokens=False)
                self.rows[row] = self.engine.script(prompt)
            ids = self.engine.encode_turn(self.rows[row](_turn_text(new, tokenizer)))
            room = min(budget, self.max_len + 1 - len(history))
            reasons[row] = STOP if len(ids) <= room else LENGTH
            ids = ids[:room]
            history.extend(ids)
            tokens[row, : len(ids)] = ids
            logprobs[row, : len(ids)] = [
                -0.01 * (1 + (len(history) + i) % 7) for i in range(len(ids))
            ]
            num[row] = len(ids)
        out = Generation(tokens, logprobs, num, tuple(reasons))
        self.calls.append((list(appends), out))
        return out


class ScriptedEngine:
    """A RolloutEngine whose turns come from `script(prompt_text) -> turn(observation)`.

    `turn` returns an `Action` (rendered as the chat template renders an assistant
    message: a tool call, or text for `respond`) or a raw string (emitted verbatim,
    then `<|im_end|>`). `sessions` keeps every session opened.
    """

    def __init__(self, tokenizer, script, *, max_new_tokens: int = 512):
        from ctu.sampling import SamplingConfig

        self.tokenizer = tokenizer
        self.script = script
        self.sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,)
        )
        self.sessions = []
        self.weight_updates = 0

    def update_weights(self, model) -> None:
        del model
        self.weight_updates += 1

    def session(self, batch_size: int, max_len: int):
        session = ScriptedSession(self, batch_size, max_len)
        self.sessions.append(session)
        return session

    def encode_turn(self, turn) -> list:
        from ctu.text import assistant_completion
        from ctu.world.tools import TOOL_SCHEMAS

        if isinstance(turn, str):
            text = turn + "<|im_end|>"
        elif turn.name == "respond":
            message = {"role": "assistant", "content": turn.kwargs["content"]}
            text = assistant_completion(self.tokenizer, message, TOOL_SCHEMAS)
        else:
            call = {"name": turn.name, "arguments": turn.kwargs}
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
            text = assistant_completion(self.tokenizer, message, TOOL_SCHEMAS)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def oracle_script(world, *, first_turns=(), fail_unless_guided: bool = False):
    """A script that plays the oracle for the task whose request ends the prompt's user turn.

    `first_turns` are turns emitted before the oracle starts (e.g. a broken call).
    `fail_unless_guided`: a rollout whose prompt has no `<previous_attempts>` block
    gives up at once (score 0), one with the block plays the oracle, so tests can see
    critiques flow through groups.
    """
    from ctu.world import agents

    by_request = {}
    for task in world.tasks.values():
        by_request.setdefault(task.user_request, []).append(task.task_id)

    def script(prompt: str):
        start = prompt.rindex("<|im_start|>user\n") + len("<|im_start|>user\n")
        opening = prompt[start : prompt.rindex("<|im_end|>")]
        task_id = next(ids[0] for request, ids in by_request.items() if opening.endswith(request))
        guided = "<previous_attempts>" in prompt
        fail = fail_unless_guided and not guided
        policy = agents.Oracle(world)
        policy.reset(task_id, opening)
        queue = list(first_turns)

        def turn(observation: str):
            if queue:
                return queue.pop(0)
            if fail:
                from ctu.world.env import Action

                return Action("respond", {"content": "Sorry, I cannot help with that."})
            return policy.act(observation)

        return turn

    return script


# --- Feedback: an OpenAI-compatible chat-completions endpoint -------------------------


@contextlib.contextmanager
def fake_completions(reply: str | None):
    """Serves `reply` to every POST on a local port; yields (base_url, requests), the
    JSON bodies received so far."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server API)
            requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", requests
    finally:
        server.shutdown()
        server.server_close()
