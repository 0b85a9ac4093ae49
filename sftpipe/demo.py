"""The built-in offline dataset: short tasks whose answers can be checked exactly.

Every instruction is unique within a generated set, so a held-out split never repeats a training
prompt. Instances whose key hashes into the reserved bucket are kept out of training sets and form
the multiple-choice lm-eval task, so that task is never trained on either. Preference pairs (the
right answer chosen, a plausible wrong one rejected) come from the same stream after the first
`PAIRS_OFFSET` instances, so they never repeat an instruction of an SFT set of up to that many rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from .io import write_jsonl

WORDS = (
    "apple river candle meadow pencil window harbor lantern garden violin rocket pillow "
    "basket forest mirror ladder cactus button tunnel island carpet helmet saddle marble "
    "bridge falcon jacket kettle lemon magnet needle orchard parrot quartz ribbon shovel "
    "teapot umbrella valley wagon yogurt zipper anchor blanket cobweb dolphin engine feather "
    "glacier hammer igloo jungle koala lobster napkin oyster pepper rabbit sandal tulip"
).split()

NUMBER_WORDS = ["two", "three", "four", "five"]


def _reverse_words(rng: random.Random) -> tuple[str, str, list[str]]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    answer = " ".join(reversed(words))
    distractors = [" ".join(words), " ".join(words[1:] + words[:1]), " ".join(reversed(words[1:] + words[:1]))]
    return f"Reverse the order of these words: {' '.join(words)}", answer, distractors


def _last_word(rng: random.Random) -> tuple[str, str, list[str]]:
    words = rng.sample(WORDS, rng.randint(4, 6))
    return f"What is the last word in this list: {', '.join(words)}?", words[-1], [words[0], words[1], words[-2]]


def _larger_number(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.sample(range(10, 1000), 2)
    low = min(a, b)
    return f"Which number is larger, {a} or {b}?", str(max(a, b)), [str(low), str(a + b), str(abs(a - b))]


def _next_number(rng: random.Random) -> tuple[str, str, list[str]]:
    n = rng.randint(1, 9998)
    return f"What number comes right after {n}?", str(n + 1), [str(n - 1), str(n), str(n + 2)]


def _sort_numbers(rng: random.Random) -> tuple[str, str, list[str]]:
    nums = rng.sample(range(1, 100), 3)
    ordered = sorted(nums)
    wrong = [ordered[::-1], nums if nums != ordered else nums[::-1], [ordered[1], ordered[0], ordered[2]]]
    return (
        f"Sort these numbers from smallest to largest: {' '.join(map(str, nums))}",
        " ".join(map(str, ordered)),
        [" ".join(map(str, w)) for w in wrong],
    )


def _count_words(rng: random.Random) -> tuple[str, str, list[str]]:
    count = rng.randint(2, 7)
    words = rng.sample(WORDS, count)
    return (
        f"How many words are in this list: {' '.join(words)}?",
        str(count),
        [str(count + 1), str(count - 1), str(count + 2)],
    )


def _repeat_word(rng: random.Random) -> tuple[str, str, list[str]]:
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    spelled = NUMBER_WORDS[times - 2]
    other = [" ".join([word] * k) for k in (1, 2, 3, 4, 5, 6) if k != times][:3]
    return f"Write the word {word} {spelled} times, separated by spaces.", " ".join([word] * times), other


def _add_numbers(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    s = a + b
    return f"What is {a} plus {b}?", str(s), [str(s + 1), str(s - 1), str(s + 10)]


TASKS: dict[str, Callable[[random.Random], tuple[str, str, list[str]]]] = {
    "reverse_words": _reverse_words,
    "last_word": _last_word,
    "larger_number": _larger_number,
    "next_number": _next_number,
    "sort_numbers": _sort_numbers,
    "count_words": _count_words,
    "repeat_word": _repeat_word,
    "add_numbers": _add_numbers,
}

RESERVED_BUCKETS = 10  # 1 in 10 instances is reserved for the lm-eval task


def _reserved(instruction: str) -> bool:
    return int(hashlib.sha256(instruction.encode()).hexdigest()[:8], 16) % RESERVED_BUCKETS == 0


def _instances(seed: int, reserved: bool) -> Iterator[tuple[str, str, str, list[str]]]:
    """Unique instances, the tasks taking turns; a task whose space is used up drops out of the turn."""
    rng = random.Random(seed)
    active = sorted(TASKS)
    seen: set[str] = set()
    turn = 0
    while active:
        name = active[turn % len(active)]
        for _ in range(1000):
            instruction, answer, distractors = TASKS[name](rng)
            if instruction not in seen and _reserved(instruction) == reserved:
                seen.add(instruction)
                yield name, instruction, answer, distractors
                turn += 1
                break
        else:
            active.remove(name)


def generate_demo_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Instruction rows `{id, task, instruction, output}`, tasks interleaved evenly."""
    rows = []
    for i, (task, instruction, answer, _) in enumerate(islice(_instances(seed, reserved=False), count)):
        rows.append({"id": f"demo-{i:06d}", "task": task, "instruction": instruction, "output": answer})
    return rows


# Instances the SFT rows may take before the preference pairs start (the demo trains on 1,600).
PAIRS_OFFSET = 4000


def generate_demo_pair_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference rows `{id, task, prompt, chosen, rejected}`: the right answer and one of its
    distractors, drawn per row, from instances no SFT set of up to `PAIRS_OFFSET` rows holds."""
    rng = random.Random(seed + 2)
    rows = []
    instances = islice(_instances(seed, reserved=False), PAIRS_OFFSET, PAIRS_OFFSET + count)
    for i, (task, instruction, answer, distractors) in enumerate(instances):
        rejected = rng.choice([d for d in distractors if d != answer])
        rows.append({"id": f"demo-pair-{i:06d}", "task": task, "prompt": instruction, "chosen": answer, "rejected": rejected})
    return rows


# The built-in presets' generators, by preset name.
GENERATORS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "sftpipe_demo": generate_demo_rows,
    "sftpipe_demo_pairs": generate_demo_pair_rows,
}


def generate_demo_choice_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice rows `{id, task, question, choices, answer_index}` from the reserved instances."""
    rng = random.Random(seed + 1)
    rows = []
    for i, (task, instruction, answer, distractors) in enumerate(islice(_instances(seed, reserved=True), count)):
        options = list(dict.fromkeys([answer, *distractors]))
        rng.shuffle(options)
        rows.append(
            {
                "id": f"demo-mc-{i:06d}",
                "task": task,
                "question": instruction,
                "choices": options,
                "answer_index": options.index(answer),
            }
        )
    return rows


def write_demo_choice_task(out_path: str | Path, count: int, seed: int = 0) -> int:
    """Write the data file of the `sftpipe_demo_mc` lm-eval task."""
    return write_jsonl(out_path, generate_demo_choice_rows(count, seed))
