"""N-gram decontamination: the evaluation documents' texts, and an index of their word n-grams (or of
held-out rows') that finds which a training row holds."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from .words import words

MIN_REFERENCE_WORDS = 6  # a shorter evaluation text is too generic to prove contamination


def _strip_common_affixes(texts: list[list[str]]) -> list[list[str]]:
    """Drop the words every document starts or ends with ("Question: ... Answer:"): template, not content."""
    if len(texts) < 2:
        return texts
    shortest = min(len(t) for t in texts)
    prefix = next((i for i in range(shortest) if len({t[i] for t in texts}) > 1), shortest)
    suffix = next((i for i in range(shortest - prefix) if len({t[-1 - i] for t in texts}) > 1), shortest - prefix)
    return [t[prefix : len(t) - suffix] for t in texts]


def eval_references(tasks: Iterable[Any]) -> list[tuple[str, list[str]]]:
    """(task#doc, words) for every evaluation document: its question or context, alone and with its
    choices or target, with the task's prompt template stripped."""
    from .tasks import build_task, task_manager

    tasks = list(tasks)
    if not tasks:
        return []  # no need to build lm-eval's task index
    manager = task_manager(tuple(sorted({spec.name for spec in tasks})))
    references = []
    for spec in tasks:
        task = build_task(manager, spec)
        docs = list(task.eval_docs)
        questions = _strip_common_affixes([words(str(task.doc_to_text(doc))) for doc in docs])
        for index, (doc, question) in enumerate(zip(docs, questions, strict=True)):
            if task.OUTPUT_TYPE == "multiple_choice":
                answers = [words(str(choice)) for choice in task.doc_to_choice(doc)]
            else:
                answers = [words(str(task.doc_to_target(doc)))]
            label = f"{spec.name}#{index}"
            references.append((label, question))
            references += [(label, question + answer) for answer in answers]
    return references


class NgramIndex:
    """Word n-grams of reference texts -> the label of the first text holding each: a row holds a
    reference's n-gram, or a whole reference shorter than n words. References shorter than
    MIN_REFERENCE_WORDS are too generic to prove contamination and are left out.

    Every gram is at least MIN_REFERENCE_WORDS long, so grams are found by their first
    MIN_REFERENCE_WORDS words: a row's words are cut into those prefixes once, whatever the grams'
    sizes, and a prefix hit is checked word by word. The index of evaluation documents is a dict (it
    grows with the configured evaluation sets only); `hashed` keeps 64-bit hashes of the prefixes in
    sorted arrays instead, with each reference as one string, for held-out rows, whose number grows
    with the data."""

    def __init__(self, references: Iterable[tuple[str, list[str]]], n: int, hashed: bool = False) -> None:
        self.n, self.hashed = n, hashed
        self.labels: list[str] = []
        self.texts: list[str] = []  # a hashed index's references, their words joined by spaces
        prefixes: dict[tuple[str, ...], list[tuple[tuple[str, ...], int]]] = {}
        owner_of: dict[tuple[str, ...], int] = {}
        hashes, owners, starts = array("q"), array("i"), array("i")
        for label, tokens in references:
            if len(tokens) < MIN_REFERENCE_WORDS:
                continue
            owner, size = len(self.labels), min(n, len(tokens))
            self.labels.append(label)
            if hashed:
                self.texts.append(" ".join(tokens))
            for start in range(len(tokens) - size + 1):
                prefix = tuple(tokens[start : start + MIN_REFERENCE_WORDS])
                if hashed:
                    hashes.append(hash(prefix))
                    owners.append(owner)
                    starts.append(start)
                elif (gram := tuple(tokens[start : start + size])) not in owner_of:
                    owner_of[gram] = owner
                    prefixes.setdefault(prefix, []).append((gram, owner))
        if hashed:
            import numpy as np

            order = np.argsort(np.frombuffer(hashes, dtype=np.int64), kind="stable")
            self.keys = np.frombuffer(hashes, dtype=np.int64)[order]
            self.owners = np.frombuffer(owners, dtype=np.int32)[order]
            self.starts = np.frombuffer(starts, dtype=np.int32)[order]
        self.prefixes = prefixes

    def __bool__(self) -> bool:
        return bool(self.labels)

    def _candidates(self, prefixes: list[tuple[str, ...]]) -> Iterator[tuple[int, tuple[str, ...], int]]:
        """(position in the row, gram, reference) for each reference gram starting like the row at a position."""
        if not self.hashed:
            for at, prefix in enumerate(prefixes):
                for gram, owner in self.prefixes.get(prefix, ()):
                    yield at, gram, owner
            return
        import numpy as np

        hashes = np.fromiter(map(hash, prefixes), dtype=np.int64, count=len(prefixes))
        low, high = np.searchsorted(self.keys, hashes, "left"), np.searchsorted(self.keys, hashes, "right")
        for at in np.nonzero(high > low)[0]:
            for j in range(low[at], high[at]):
                tokens = self.texts[self.owners[j]].split(" ")
                start = int(self.starts[j])
                yield int(at), tuple(tokens[start : start + min(self.n, len(tokens))]), int(self.owners[j])

    def match(self, tokens: list[str]) -> dict[str, str] | None:
        """The first (in sorted order) of the reference grams the row holds: its reference's label and the gram."""
        prefixes = [tuple(tokens[i : i + MIN_REFERENCE_WORDS]) for i in range(len(tokens) - MIN_REFERENCE_WORDS + 1)]
        hits = [(gram, owner) for at, gram, owner in self._candidates(prefixes) if tuple(tokens[at : at + len(gram)]) == gram]
        if not hits:
            return None
        gram, owner = min(hits)
        return {"match": self.labels[owner], "ngram": " ".join(gram)}
