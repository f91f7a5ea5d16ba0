"""A small seeded mutation fuzzer for workflow JSON (UI and API form).

`mutate(doc, seed)` returns the JSON *text* of a mutated copy of `doc`: the same seed always gives
the same text, so a failing case is reproduced from its seed alone and can be checked in as a
regression seed (tests/data/fuzz_seeds/). The mutations are the ones an attack run found to hurt:
dropped, duplicated and renamed keys, values swapped for another JSON type, huge integers, deep
nesting, NaN/Infinity, lone surrogates, long strings, and UI link rows shifted by one or holding a
dict or Infinity as a slot. Each mutation is aimed at a random place in the document; a third of
them at the keys a workflow reader trusts most (`class_type`, `_meta`, `type`, `inputs`, `links`).
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

# Keys the readers look at first: a mutation aimed here finds more than one aimed at random.
HOT_KEYS = ("class_type", "_meta", "title", "inputs", "type", "links", "link", "widgets_values", "nodes",
            "id", "outputs", "mode", "slot_index", "name", "widget")


class Raw:
    """Text spliced into the output verbatim (nesting too deep for `json.dumps`, literal NaN…)."""

    def __init__(self, text: str):
        self.text = text


def dumps(value: Any) -> str:
    """JSON text of `value`; `Raw` parts verbatim; NaN/±Infinity as Python's json writes them."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(json.dumps(str(k)) + ": " + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**4000:
        return str(value) if value >= 0 else "-" + str(-value)  # past int's default str limit
    return json.dumps(value)  # ensure_ascii: a lone surrogate is written as a \\udXXX escape


def _huge_int(rng: random.Random) -> Any:
    digits = rng.choice([20, 40, 400, 5000])
    if digits > 4000:
        return Raw("9" * digits)
    return int("9" * digits) * rng.choice([1, -1])


def _deep(rng: random.Random) -> Raw:
    depth = rng.choice([100, 3000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
    return Raw(opener * depth + "0" + closer * depth)


def _random_value(rng: random.Random, like: Any) -> Any:
    """A value of another JSON type than `like` (or a hostile one of the same type)."""
    pool = [
        None, True, False, 0, -1, 1, 2, 7, 1.5, -0.0, "", "x", "0", "SDXL", [], {}, [1, 2], ["1", 0],
        ["1", 0, 2], {"a": 1}, {"__value__": 1}, [[1]], float("nan"), float("inf"), float("-inf"),
        "\ud800", "a\udfffb", "x" * 3000, "..", "../../etc/passwd", "/", "sub/..", ".", "",
        lambda: _huge_int(rng), lambda: _deep(rng), [{"x": 1}], ["a", "b"], [1, "a"],
    ]
    for _ in range(10):
        v = rng.choice(pool)
        v = v() if callable(v) else copy.deepcopy(v)
        if type(v) is not type(like) or isinstance(v, (str, float)):
            return v
    return None


def _containers(doc: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) pair in the document, breadth first."""
    out: list[tuple[Any, Any]] = []
    todo = [doc]
    while todo:
        c = todo.pop()
        items = c.items() if isinstance(c, dict) else enumerate(c) if isinstance(c, list) else ()
        for k, v in items:
            out.append((c, k))
            if isinstance(v, (dict, list)):
                todo.append(v)
    return out


def _pick(rng: random.Random, doc: Any) -> tuple[Any, Any] | None:
    places = _containers(doc)
    if not places:
        return None
    if rng.random() < 0.35:
        hot = [(c, k) for c, k in places if k in HOT_KEYS]
        if hot:
            return rng.choice(hot)
    return rng.choice(places)


def _link_rows(doc: Any) -> list[list]:
    links = doc.get("links") if isinstance(doc, dict) else None
    return [row for row in links if isinstance(row, list)] if isinstance(links, list) else []


def _mutate_once(rng: random.Random, doc: Any) -> str:
    kind = rng.choice(["drop", "duplicate", "rename", "swap", "swap", "huge_int", "deep", "nan", "surrogate",
                       "shift_link", "slot", "long_string"])
    if kind in ("shift_link", "slot"):
        rows = _link_rows(doc)
        if rows:
            row = rng.choice(rows)
            if kind == "shift_link":
                row.insert(rng.randrange(len(row) + 1), rng.choice([0, 1, "LATENT", None]))
                if rng.random() < 0.5:
                    row.pop(rng.randrange(len(row)))
            else:
                row[rng.randrange(len(row))] = rng.choice([{"a": 1}, float("inf"), float("nan"), -1, 10**30, "1"])
            return kind
        kind = "swap"
    place = _pick(rng, doc)
    if place is None:
        return "none"
    c, k = place
    if kind == "drop":
        del c[k]
    elif kind == "duplicate":
        if isinstance(c, dict):
            c[f"{k}_copy" if rng.random() < 0.5 else rng.choice(list(HOT_KEYS))] = copy.deepcopy(c[k])
        else:
            c.insert(k, copy.deepcopy(c[k]))
    elif kind == "rename" and isinstance(c, dict):
        c[rng.choice(HOT_KEYS + (str(k).upper(), "", str(k) + " "))] = c.pop(k)
    elif kind == "huge_int":
        c[k] = _huge_int(rng)
    elif kind == "deep":
        c[k] = _deep(rng)
    elif kind == "nan":
        c[k] = rng.choice([float("nan"), float("inf"), float("-inf")])
    elif kind == "surrogate":
        c[k] = rng.choice(["\ud800", "cat \udc00 dog", "\udbff"])
    elif kind == "long_string":
        c[k] = rng.choice(["(" * 5000, "a " * 20_000, "%year%/" * 100, "x" * 300])
    else:
        c[k] = _random_value(rng, c[k])
    return kind


def mutate(doc: Any, seed: int, max_mutations: int = 3) -> str:
    """JSON text of `doc` after 1..max_mutations seeded mutations (deterministic per seed)."""
    rng = random.Random(seed)
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, max_mutations)):
        _mutate_once(rng, doc)
    return dumps(doc)


def is_finite_json(text: str) -> bool:
    """Whether JSON text parses under strict JSON rules (no NaN/Infinity): for checking outputs."""
    try:
        json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError:
        return False
    return True


__all__ = ["Raw", "dumps", "is_finite_json", "mutate"]
