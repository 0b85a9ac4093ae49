"""The built-in demo dataset: unique prompts, correct answers, lm-eval rows kept out of training."""

import re

from sftpipe.demo import TASKS, generate_demo_choice_rows, generate_demo_rows


def _check(instruction: str, output: str) -> bool:
    numbers = [int(n) for n in re.findall(r"\d+", instruction)]
    if instruction.startswith("Reverse the order of these words: "):
        return output.split() == instruction.split(": ", 1)[1].split()[::-1]
    if instruction.startswith("What is the last word"):
        return output == instruction.rstrip("?").split(", ")[-1]
    if instruction.startswith("Which number is larger"):
        return int(output) == max(numbers)
    if instruction.startswith("What number comes right after"):
        return int(output) == numbers[0] + 1
    if instruction.startswith("Sort these numbers"):
        return [int(n) for n in output.split()] == sorted(numbers)
    if instruction.startswith("How many words"):
        return int(output) == len(instruction.rstrip("?").split(": ", 1)[1].split())
    if instruction.startswith("Write the word"):
        word, times = instruction.split()[3], ["two", "three", "four", "five"].index(instruction.split()[4]) + 2
        return output == " ".join([word] * times)
    if instruction.startswith("What is") and "plus" in instruction:
        return int(output) == sum(numbers)
    raise AssertionError(f"unknown task: {instruction}")


def test_every_answer_is_correct_and_prompts_are_unique():
    rows = generate_demo_rows(2000, seed=0)
    assert len({r["instruction"] for r in rows}) == 2000
    assert {r["task"] for r in rows} == set(TASKS)
    assert all(_check(r["instruction"], r["output"]) for r in rows)


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_demo_rows(100, seed=1) == generate_demo_rows(100, seed=1)
    assert generate_demo_rows(100, seed=1) != generate_demo_rows(100, seed=2)


def test_choice_rows_are_disjoint_from_training_and_hold_the_answer():
    training = {r["instruction"] for r in generate_demo_rows(3000, seed=0)}
    choices = generate_demo_choice_rows(200, seed=0)
    assert not training & {c["question"] for c in choices}
    for row in choices:
        assert len(row["choices"]) == len(set(row["choices"])) >= 3
        assert _check(row["question"], row["choices"][row["answer_index"]])
