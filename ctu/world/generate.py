"""Deterministic world generation from a seed.

Only `random.Random(seed)` draws randomness, and every choice iterates over a
sorted or fixed-order sequence, so one seed gives byte-identical files.

Design (documented in docs/architecture.md, "World data"):
- Auth prior: each department type has a typical auth set (AUTH_PRIOR). A
  company varies it with probability AUTH_VARIATION_PROB (add, drop or swap one
  field), so the prior solves many tasks but not all.
- Alternate auth set (level 4): with probability ALTERNATE_PROB a department
  also accepts its primary set with one field f replaced by SUBSTITUTES[f]
  (a global rule, hence learnable). A level-4 user lacks f, says so in the
  opening message, and the task is solved with the alternate set.
- Routing: departments may require a lower-rank department first
  (ROUTING_RANK; e.g. Fraud before Billing).
"""

from __future__ import annotations

import itertools
import json
import os
import random

from ctu.world import data

NUM_COMPANIES = 100
NUM_USERS = 500
TASK_COUNTS = {
    "train": {1: 100, 2: 150, 3: 150, 4: 50, 5: 50},
    "val": {1: 20, 2: 30, 3: 30, 4: 10, 5: 10},
    "test": {1: 100, 2: 150, 3: 150, 4: 50, 5: 50},
}
# Companies kept out of train and val so test measures generalisation.
NUM_HELD_OUT_COMPANIES = 10
# Share of test tasks placed on held-out companies.
HELD_OUT_TEST_FRACTION = 0.2
# Profile completeness, behaviour and emotion counts (SPEC: 80/15/5, 70/20/10, uniform).
COMPLETENESS_COUNTS = {"complete": 400, "one": 75, "several": 25}
BEHAVIOR_COUNTS = {"cooperative": 350, "needs_clarification": 100, "difficult": 50}

AUTH_PRIOR = {
    "customer_service": ("name", "account_number"),
    "billing": ("name", "account_number", "date_of_birth"),
    "technical_support": ("account_number", "phone"),
    "sales": ("name", "phone"),
    "fraud": ("name", "last_4_ssn", "date_of_birth", "credit_card_last4"),
}
# About a third of departments deviate from the prior: enough that per-company
# knowledge matters, few enough that the prior is worth learning.
AUTH_VARIATION_PROB = 0.35
ALTERNATE_PROB = 0.5
# If you lack field f, the alternate set uses the first of these not already asked.
SUBSTITUTES = {
    "account_number": ("credit_card_last4", "phone", "address"),
    "last_4_ssn": ("date_of_birth", "address", "phone"),
    "date_of_birth": ("address", "last_4_ssn", "phone"),
    "credit_card_last4": ("account_number", "address", "phone"),
    "phone": ("address", "date_of_birth", "account_number"),
    "address": ("phone", "date_of_birth", "account_number"),
}
# A department may require one of strictly lower rank first; ranks keep it acyclic.
ROUTING_RANK = {"fraud": 0, "customer_service": 1, "billing": 2, "technical_support": 2, "sales": 2}
ROUTING_PROB = 0.45
DEPARTMENT_COUNT_CHOICES = (2, 3, 3, 4, 4, 5)

INDUSTRIES = {
    "bank": ("Bank", "Financial"),
    "insurance": ("Insurance", "Assurance"),
    "telecom": ("Wireless", "Telecom"),
    "retail": ("Stores", "Outlet"),
    "utilities": ("Energy", "Power"),
    "airline": ("Airlines", "Air"),
    "streaming": ("Media", "Streaming"),
    "healthcare": ("Health", "Care"),
}
_PREFIXES = (
    "North South East West Blue Red Green Silver Gold Iron "
    "Stone Oak Pine Maple Cedar River Lake Sun Star Bright"
).split()
_ROOTS = (
    "field ridge gate wood brook view point haven crest vale "
    "port bridge dale hill shore land mark line way bay"
).split()
_FIRST = (
    "Ava Ben Chloe Dev Ella Finn Grace Hugo Iris Jack Kira Leo Maya Noah Olive "
    "Paul Quinn Rosa Sam Tara Uma Victor Wren Xavier Yara Zane Amir Bea Carlos Dina"
).split()
_LAST = (
    "Adams Brooks Chen Diaz Evans Fischer Garcia Hughes Ito Jones Khan Lopez Miller "
    "Nguyen Olsen Patel Quinn Reyes Singh Torres Usman Vega Walsh Young Zhou"
).split()
_STREETS = "Maple Oak Pine Cedar Elm Birch Lake Hill Park River".split()
_STREET_KINDS = ("St", "Ave", "Rd", "Ln")
_CITIES = ("Springfield", "Riverton", "Fairview", "Lakeside", "Greenville", "Madison")
FIELD_PHRASES = {
    "name": "full name",
    "account_number": "account number",
    "last_4_ssn": "Social Security number",
    "date_of_birth": "date of birth",
    "address": "address",
    "phone": "phone number",
    "credit_card_last4": "credit card",
}


def _ordered(fields) -> list[str]:
    return [f for f in data.AUTH_FIELDS if f in set(fields)]


def _vary_auth(rng: random.Random, prior: tuple[str, ...]) -> list[str]:
    fields = list(prior)
    if rng.random() >= AUTH_VARIATION_PROB:
        return fields
    absent = [f for f in data.AUTH_FIELDS if f not in fields]
    droppable = [f for f in fields if f != "name"]
    move = rng.choice(("add", "drop", "swap"))
    if move in ("drop", "swap") and len(droppable) > 1:
        fields.remove(rng.choice(droppable))
    if move in ("add", "swap") and absent:
        fields.append(rng.choice(absent))
    return _ordered(fields)


def _alternate(rng: random.Random, primary: list[str]) -> list[str]:
    replaceable = [f for f in primary if f != "name"]
    if not replaceable or rng.random() >= ALTERNATE_PROB:
        return []
    lacking = rng.choice(replaceable)
    substitute = next(s for s in SUBSTITUTES[lacking] if s not in primary)
    return _ordered([f for f in primary if f != lacking] + [substitute])


def _description(kind: str, handles: list[str]) -> str:
    phrases = [data.REQUEST_PHRASES[r].replace(" my ", " your ") for r in handles]
    return f"{data.DEPARTMENT_NAMES[kind]}. Call us to " + "; ".join(phrases) + "."


def _phone(rng: random.Random, used: set) -> str:
    while True:
        area = rng.choice(("800", "888", "877", "866"))
        number = f"+1-{area}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
        if number not in used:
            used.add(number)
            return number


def _company(rng: random.Random, index: int, stem: str, industry: str, phones: set) -> dict:
    cid = f"C{index:03d}"
    suffixes = INDUSTRIES[industry]
    k = rng.choice(DEPARTMENT_COUNT_CHOICES)
    picked = set(rng.sample(data.DEPARTMENT_TYPES, k))
    kinds = [t for t in data.DEPARTMENT_TYPES if t in picked]
    departments = []
    for kind in kinds:
        pool = data.REQUEST_TYPES_BY_DEPARTMENT[kind]
        chosen = set(rng.sample(pool, rng.choice((2, 3))))
        handles = [r for r in pool if r in chosen]
        primary = _vary_auth(rng, AUTH_PRIOR[kind])
        lower = [f"{cid}-{t}" for t in kinds if ROUTING_RANK[t] < ROUTING_RANK[kind]]
        prereqs = [rng.choice(lower)] if lower and rng.random() < ROUTING_PROB else []
        departments.append(
            {
                "department_id": f"{cid}-{kind}",
                "type": kind,
                "name": data.DEPARTMENT_NAMES[kind],
                "phone_number": _phone(rng, phones),
                "description": _description(kind, handles),
                "handles": handles,
                "auth_fields": primary,
                "alternate_auth_fields": _alternate(rng, primary),
                "prerequisites": prereqs,
            }
        )
    return {
        "company_id": cid,
        "name": f"{stem} {suffixes[0]}",
        "industry": industry,
        "aliases": [stem, f"{stem} {suffixes[1]}"],
        "departments": departments,
    }


def generate_companies(rng: random.Random) -> list[dict]:
    stems = rng.sample([p + r for p in _PREFIXES for r in _ROOTS], NUM_COMPANIES)
    industries = sorted(INDUSTRIES)
    phones: set[str] = set()
    return [
        _company(rng, i, stems[i], industries[i % len(industries)], phones)
        for i in range(NUM_COMPANIES)
    ]


def _counted(rng: random.Random, counts: dict) -> list:
    items = [k for k, n in counts.items() for _ in range(n)]
    rng.shuffle(items)
    return items


def _profile_values(rng: random.Random) -> dict[str, str]:
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    account_number = f"{rng.randint(0, 10**10 - 1):010d}"
    last_4_ssn = f"{rng.randint(0, 9999):04d}"
    year, month, day = rng.randint(1940, 2004), rng.randint(1, 12), rng.randint(1, 28)
    number, street = rng.randint(1, 9999), rng.choice(_STREETS)
    kind, city = rng.choice(_STREET_KINDS), rng.choice(_CITIES)
    phone = f"555-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
    return {
        "name": name,
        "account_number": account_number,
        "last_4_ssn": last_4_ssn,
        "date_of_birth": f"{year}-{month:02d}-{day:02d}",
        "address": f"{number} {street} {kind}, {city}",
        "phone": phone,
        "credit_card_last4": f"{rng.randint(0, 9999):04d}",
    }


def generate_users(rng: random.Random) -> list[dict]:
    completeness = _counted(rng, COMPLETENESS_COUNTS)
    behaviors = _counted(rng, BEHAVIOR_COUNTS)
    emotions = _counted(rng, {e: NUM_USERS // len(data.EMOTIONS) for e in data.EMOTIONS})
    missable = data.AUTH_FIELDS[1:]
    users = []
    for i in range(NUM_USERS):
        values = _profile_values(rng)
        if completeness[i] == "one":
            missing = [rng.choice(missable)]
        elif completeness[i] == "several":
            missing = rng.sample(missable, rng.choice((2, 3)))
        else:
            missing = []
        for f in missing:
            values[f] = None
        users.append(
            {
                "user_id": f"U{i:04d}",
                **values,
                "missing_fields": _ordered(missing),
                "behavior": behaviors[i],
                "emotion": emotions[i],
            }
        )
    return users


# ---- tasks -----------------------------------------------------------------------------


def _topological(departments: list[data.Department]) -> list[data.Department]:
    """Prerequisites first; ties by routing rank then type order (deterministic)."""
    order = data.DEPARTMENT_TYPES
    return sorted(departments, key=lambda d: (ROUTING_RANK[d.type], order.index(d.type)))


def _candidates(company: data.Company, level: int) -> list[list[data.Department]]:
    """Department lists (in serving order) that fit a level's shape."""
    depts = company.departments
    free = [d for d in depts if not d.prerequisites]
    if level == 1:
        return [[d] for d in free if len(d.auth_fields) <= 2]
    if level == 2:
        return [[d] for d in free if 3 <= len(d.auth_fields) <= 4]
    if level == 4:
        return [[d] for d in free if d.alternate_auth_fields]
    if level == 3:
        by_id = {d.department_id: d for d in depts}
        return [
            [by_id[d.prerequisites[0]], d]
            for d in depts
            if len(d.prerequisites) == 1 and not by_id[d.prerequisites[0]].prerequisites
        ]
    closed = []
    for size in range(3, len(depts) + 1):
        for combo in itertools.combinations(depts, size):
            ids = {d.department_id for d in combo}
            if all(set(d.prerequisites) <= ids for d in combo):
                closed.append(_topological(list(combo)))
    return closed


def _eligible(user: data.UserProfile, level: int, depts: list[data.Department]) -> bool:
    if level == 1 and user.missing_fields:
        return False
    if level != 4:
        return all(user.has(f) for d in depts for f in d.auth_fields)
    (d,) = depts
    lacks_primary = not all(user.has(f) for f in d.auth_fields)
    return lacks_primary and all(user.has(f) for f in d.alternate_auth_fields)


def _typo(rng: random.Random, text: str) -> str:
    i = rng.randrange(1, len(text) - 2)
    if text[i] == " " or text[i + 1] == " ":
        return text[:i] + text[i + 1 :]
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _mention(rng: random.Random, company: data.Company) -> str:
    roll = rng.random()
    if roll < 0.6:
        return company.name
    if roll < 0.85:
        return rng.choice(company.aliases)
    return _typo(rng, company.name)


def _user_request(rng, company, user, level, requests, depts) -> str:
    phrases = [data.REQUEST_PHRASES[r] for r in requests]
    rng.shuffle(phrases)  # the user does not know the routing order
    asks = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    opener = rng.choice(
        (
            "Hi, can you call {c} for me? I need to {a}.",
            "Hello. I need to {a} with {c}.",
            "I want to {a}. The company is {c}.",
            "Could you contact {c}? I have to {a}.",
        )
    )
    text = opener.format(c=_mention(rng, company), a=asks)
    if level == 4:
        lacking = [f for f in depts[0].auth_fields if not user.has(f)]
        text += " I don't have my " + " or my ".join(FIELD_PHRASES[f] for f in lacking) + "."
    return text


def _make_task(rng, world, level, company, split, held_out) -> dict | None:
    options = _candidates(company, level)
    if not options:
        return None
    depts = rng.choice(options)
    users = [u for u in world.users.values() if _eligible(u, level, depts)]
    if not users:
        return None
    user = rng.choice(users)
    request_types = [rng.choice(d.handles) for d in depts]
    required = {f for d in depts for f in data.auth_set_for(d, user)}
    return {
        "task_id": "",
        "split": split,
        "level": level,
        "company_id": company.company_id,
        "user_id": user.user_id,
        "user_request": _user_request(rng, company, user, level, request_types, depts),
        "requests": [
            {"request_type": r, "department_id": d.department_id}
            for r, d in zip(request_types, depts, strict=True)
        ],
        "required_auth_fields": _ordered(required),
        "held_out_company": held_out,
    }


def _split_tasks(rng, world, split, pool_in, pool_out) -> list[dict]:
    levels = [lvl for lvl, n in TASK_COUNTS[split].items() for _ in range(n)]
    held = set()
    if split == "test":
        held = set(rng.sample(range(len(levels)), int(len(levels) * HELD_OUT_TEST_FRACTION)))
    tasks = []
    for i, level in enumerate(levels):
        pools = [pool_out, pool_in] if i in held else [pool_in]
        task = None
        for pool in pools:
            for _ in range(100):  # a few companies lack a level's shape; try another
                task = _make_task(
                    rng, world, level, world.companies[rng.choice(pool)], split, False
                )
                if task:
                    break
            if task:
                break
        if task is None:
            raise RuntimeError(f"no company can host a level-{level} task")
        tasks.append(task)
    rng.shuffle(tasks)
    for i, task in enumerate(tasks):
        task["task_id"] = f"{split}-{i:04d}"
    return tasks


def generate_world(seed: int) -> dict[str, list]:
    """All records of a world: {companies, users, train, val, test}."""
    rng = random.Random(seed)
    companies = generate_companies(rng)
    users = generate_users(rng)
    world = data.build_world(companies, users, [])
    ids = sorted(world.companies)
    held_out = set(rng.sample(ids, NUM_HELD_OUT_COMPANIES))
    pool_in = [c for c in ids if c not in held_out]
    pool_out = sorted(held_out)
    records = {"companies": companies, "users": users}
    for split in data.SPLITS:
        records[split] = _split_tasks(rng, world, split, pool_in, pool_out)
    train_companies = {t["company_id"] for t in records["train"]}
    for split in data.SPLITS:
        for task in records[split]:
            task["held_out_company"] = task["company_id"] not in train_companies
    return records


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, indent=1, separators=(",", ": ")) + "\n"


def serialize(records: dict[str, list]) -> dict[str, str]:
    """File name -> exact file contents (sorted keys, fixed separators)."""
    out = {data.FILE_NAMES[k]: _dumps(records[k]) for k in ("companies", "users")}
    for split in data.SPLITS:
        lines = (json.dumps(t, sort_keys=True, separators=(", ", ": ")) for t in records[split])
        out[data.FILE_NAMES[split]] = "".join(line + "\n" for line in lines)
    return out


def write_world(out_dir: str, seed: int) -> dict[str, str]:
    """Generates and writes a world; each file lands atomically (temp + rename).

    Everything is generated in memory first, so a failing run writes nothing.
    Returns file name -> path.
    """
    contents = serialize(generate_world(seed))
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, text in contents.items():
        path = os.path.join(out_dir, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
        paths[name] = path
    return paths
