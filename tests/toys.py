"""Shared toy fixtures for tests: tiny world, tiny model, tiny tokenizer.

Each area adds its own functions here; never rewrite another area's.
"""


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
    import tempfile

    from ctu.text import build_tokenizer

    cache = _TINY_TOKENIZER_DIRS
    if vocab_size not in cache:
        out_dir = tempfile.mkdtemp(prefix="ctu_tiny_tokenizer_")
        build_tokenizer(text_training_texts(), out_dir, vocab_size=vocab_size)
        cache[vocab_size] = out_dir
    return cache[vocab_size]


def tiny_tokenizer(vocab_size: int = 1024):
    """The tiny tokenizer, loaded with transformers.AutoTokenizer."""
    from ctu.text import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir(vocab_size))


_TINY_TOKENIZER_DIRS: dict[int, str] = {}


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
    obs = env.reset(task.task_id)
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
