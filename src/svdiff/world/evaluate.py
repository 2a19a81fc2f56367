"""Scoring images against prompts with the judge: which of the prompt's words does the picture show?"""

import torch

from .judge import SLOTS, read
from .render import COLORS, MARK_COLORS, PATTERNS, POSITION_PHRASES, SHAPES

PHRASE_TO_SLOT = {phrase: slot for slot, phrase in POSITION_PHRASES.items()}


def _names_object(words: list[str]) -> bool:
    """Whether words name an object of their own: a shape that is not an emblem's."""
    return any(w in SHAPES and words[i + 1 : i + 2] != ["emblem"] for i, w in enumerate(words))


def _parse_object(part: str) -> dict:
    words = part.replace(",", " ").split()
    obj, marks = {}, set()
    for i, w in enumerate(words):
        before = words[i - 1] if i else None
        if w == "outline" and before in MARK_COLORS:
            obj["outline"] = before
            marks.add(i - 1)
        elif w in SHAPES and words[i + 1 : i + 2] == ["emblem"]:
            obj["emblem"] = w
            marks.add(i)
            if before in MARK_COLORS:
                obj["emblem_color"] = before
                marks.add(i - 1)
    for i, w in enumerate(words):
        if i in marks:
            continue
        if w in SHAPES:
            obj["shape"] = w
        elif w in COLORS:
            obj["color"] = w
        elif w in PATTERNS:
            obj["pattern"] = w
    for phrase, slot in PHRASE_TO_SLOT.items():
        if phrase in part:
            obj["position"] = slot
    return obj


def parse_prompt(prompt: str) -> list[dict]:
    """The objects a world prompt asks for, in order: each with the shape and whatever color, pattern, marks and
    position it names. "a photo of sks heart on the left and a blue circle with a white outline on the right" →
    two objects; "and" between two marks ("a white outline and a black diamond emblem") stays in one."""
    parts = []
    for part in prompt.lower().split(" and "):
        if parts and not _names_object(part.split()):
            parts[-1] += " and " + part
        else:
            parts.append(part)
    return [obj for obj in map(_parse_object, parts) if "shape" in obj]


def match(reading: dict, wanted: list[dict]) -> list[dict]:
    """For each wanted object, the judged object that answers it and which of its attributes agree.

    An object with a position is looked for at that place; one without takes the most confident place not
    already taken. A wanted object nobody answers scores false on everything."""
    slots = reading["slots"]
    taken, results = set(), []
    for obj in wanted:
        if "position" in obj:
            slot = obj["position"]
        else:
            free = [s for s in SLOTS if s not in taken and slots[s] is not None]
            slot = max(free, key=lambda s: slots[s]["confidence"]) if free else None
        found = slots.get(slot) if slot else None
        taken.add(slot)
        checks = {k: found is not None and found[k] == v for k, v in obj.items() if k != "position"}
        if "position" in obj:
            checks["position"] = found is not None
        results.append({"wanted": obj, "found": found, "slot": slot, "correct": checks})
    return results


def similarity(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each image to the reference images (embeddings are unit vectors)."""
    return (embeddings @ references.T).mean(dim=1)


def score(model, images, prompt: str) -> list[dict]:
    """Per image: every attribute of the prompt with true/false, and whether all of them hold."""
    wanted = parse_prompt(prompt)
    out = []
    for reading in read(model, images):
        matches = match(reading, wanted)
        out.append(
            {
                "objects": matches,
                "all_correct": all(all(m["correct"].values()) for m in matches),
                "embedding": reading["embedding"],
            }
        )
    return out
