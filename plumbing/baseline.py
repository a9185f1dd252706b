"""The baseline transfer.py compares with: bag-of-words counts of the same splits, for the same classifier.

Not a technique of the papers (their comparison, and ours): a linear classifier on word counts is what the
mLSTM's features must beat to have learnt something a word list does not hold.
"""
import re
from collections import Counter

import numpy as np


def bag_of_words(train_texts, *others, vocab=2000):
    """Count matrices over the `vocab` lowercase words found in the most train texts (ties: alphabetical)."""
    tok = lambda t: re.findall(r"[a-z0-9']+", t.lower())  # noqa: E731
    counts = Counter(w for t in train_texts for w in set(tok(t)))
    words = {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab])}
    mats = []
    for texts in (train_texts, *others):
        M = np.zeros((len(texts), len(words)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in tok(t):
                if w in words:
                    M[r, words[w]] += 1
        mats.append(M)
    return mats
