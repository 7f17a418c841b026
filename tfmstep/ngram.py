"""Interpolated Kneser-Ney n-gram language model on integer tokens: the baseline the LSTM must beat.

Counts are sorted numpy arrays of 64-bit n-gram keys, looked up with ``searchsorted``, so fitting and
scoring a whole split are a few vectorised passes per order, at any order. Chen & Goodman's modified
interpolated KN: the highest order uses raw counts, lower orders use continuation counts (how many
distinct tokens precede an n-gram); each order discounts n-grams seen once, twice and three or more
times by D1, D2, D3+ estimated from its count-of-counts (Y = n1 / (n1 + 2 n2), Dk = k - (k + 1) Y
n_{k+1} / n_k), and gives the discounted mass to the next lower order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfmstep.errors import UserError


_MULTIPLIERS = np.random.default_rng(12345).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)


def _hash(columns: list) -> np.ndarray:
    """One 64-bit key per row of token columns: sum of token * odd random multiplier (wrapping).

    Sorting int keys is what makes counting fast at any order. Two distinct n-grams share a key with
    probability ~2^-64, i.e. never in practice for corpora of millions of tokens.
    """
    key = np.zeros(len(columns[0]) if columns else 1, np.uint64)
    with np.errstate(over="ignore"):
        for j, column in enumerate(columns):
            key = key + column.astype(np.uint64) * _MULTIPLIERS[j]
    return key


def _windows(tokens: np.ndarray, n: int) -> list:
    """Columns of all n-grams of ``tokens``: column j holds the j-th token of each n-gram."""
    count = len(tokens) - n + 1
    return [tokens[j:j + count] for j in range(n)]


@dataclasses.dataclass
class _Table:
    """For one order: sorted n-gram keys with counts, and per-context totals and distinct followers."""

    keys: np.ndarray
    counts: np.ndarray
    context_keys: np.ndarray
    context_totals: np.ndarray
    context_discounted: np.ndarray  # per context: sum of the discounts of its n-grams (lower-order mass)
    discounts: np.ndarray  # [D1, D2, D3+]

    @classmethod
    def from_columns(cls, columns: list, weights: np.ndarray | None = None) -> "_Table":
        """``columns`` of n-grams (repeated n-grams counted, or ``weights`` per row)."""
        keys, first, inverse = np.unique(_hash(columns), return_index=True, return_inverse=True)
        counts = np.bincount(inverse, weights=weights).astype(np.int64)
        context_rows = _hash([c[first] for c in columns[:-1]]) if len(columns) > 1 else \
            np.zeros(len(keys), np.uint64)
        context_keys, context_index = np.unique(context_rows, return_inverse=True)
        totals = np.bincount(context_index, weights=counts).astype(np.int64)
        discounts = cls.modified_discounts(counts)
        discounted = np.bincount(context_index, weights=discounts[np.minimum(counts, 3) - 1])
        return cls(keys, counts, context_keys, totals, discounted, discounts)

    @staticmethod
    def modified_discounts(counts: np.ndarray) -> np.ndarray:
        n1, n2, n3, n4 = (int(np.sum(counts == k)) for k in (1, 2, 3, 4))
        if not (n1 and n2 and n3 and n4):  # too few counts to estimate: one plain discount
            return np.full(3, 0.75)
        y = n1 / (n1 + 2 * n2)
        discounts = np.array([1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3])
        return np.clip(discounts, 0.05, np.array([0.95, 1.95, 2.95]))

    def discount(self, counts: np.ndarray) -> np.ndarray:
        return np.where(counts > 0, self.discounts[np.clip(counts, 1, 3) - 1], 0.0)

    @staticmethod
    def lookup(table_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        if not len(table_keys):
            return np.zeros(len(queries), np.int64)
        index = np.minimum(np.searchsorted(table_keys, queries), len(table_keys) - 1)
        return np.where(table_keys[index] == queries, values[index], 0)


class KneserNey:
    """``KneserNey(order, vocab_size).fit(train_tokens)``; ``bits_per_token(tokens)``."""

    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise UserError(f"n-gram order must be >= 1, got {order}")
        if order > len(_MULTIPLIERS):
            raise UserError(f"n-gram order must be <= {len(_MULTIPLIERS)}, got {order}")
        self.order = order
        self.vocab = vocab_size

    def fit(self, tokens: np.ndarray) -> "KneserNey":
        tokens = np.asarray(tokens, np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab):
            raise UserError(f"tokens must be in [0, {self.vocab})")
        self.tables = {}
        for n in range(1, self.order + 1):
            if n == self.order:
                self.tables[n] = _Table.from_columns(_windows(tokens, n))
            else:
                # Continuation count of an n-gram: distinct tokens seen before it = distinct
                # (n+1)-grams that end with it.
                longer = _windows(tokens, n + 1)
                _, first = np.unique(_hash(longer), return_index=True)
                self.tables[n] = _Table.from_columns([c[first] for c in longer[1:]])
        return self

    def log2_probs(self, tokens: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """log2 P(token_i | previous order-1 tokens) for every token; ``context`` precedes ``tokens``."""
        tokens = np.asarray(tokens, np.int64)
        history = self.order - 1
        if context is None or history == 0:
            context = np.zeros(0, np.int64)
        else:
            context = np.asarray(context, np.int64)[-history:]
        full = np.concatenate([context, tokens])
        positions = np.arange(len(context), len(full))
        prob = np.full(len(tokens), 1.0 / self.vocab)
        for n in range(1, self.order + 1):
            table = self.tables[n]
            valid = positions - (n - 1) >= 0  # enough history for this order
            starts = np.where(valid, positions - (n - 1), 0)
            columns = [full[starts + j] for j in range(n)]
            count = table.lookup(table.keys, table.counts, _hash(columns))
            contexts = _hash(columns[:-1]) if n > 1 else np.zeros(len(positions), np.uint64)
            total = table.lookup(table.context_keys, table.context_totals, contexts)
            lower_mass = table.lookup(table.context_keys, table.context_discounted, contexts)
            seen = valid & (total > 0)
            safe_total = np.maximum(total, 1)
            interpolated = (np.maximum(count - table.discount(count), 0) + lower_mass * prob) / safe_total
            prob = np.where(seen, interpolated, prob)
        return np.log2(prob)

    def bits_per_token(self, tokens: np.ndarray, context: np.ndarray | None = None) -> float:
        return float(-np.mean(self.log2_probs(tokens, context)))


def best_order(train: np.ndarray, validation: np.ndarray, vocab_size: int, orders=range(1, 13)) -> dict:
    """Fit every order; the best is chosen on validation (there is no separate test split for it)."""
    results = {}
    for order in orders:
        model = KneserNey(order, vocab_size).fit(train)
        results[order] = model.bits_per_token(validation, context=train)
    best = min(results, key=results.get)
    return {"bits_per_token_by_order": results, "best_order": best, "best_bits_per_token": results[best]}


def baseline(spec, config, max_order: int = 32) -> dict:
    """The n-gram baseline of a family whose data is a token corpus (its registry hook ``token_corpus``):
    Kneser-Ney of orders 1..``max_order`` fitted on exactly the model's train tokens and scored on its
    validation tokens, the order chosen on validation; bits per token and per byte of text (the number a
    language model is compared in). The report ``tfmstep-ngram`` prints (``baseline_table``) and writes."""
    import time

    if spec.token_corpus is None:
        raise UserError(f"model {spec.name!r} has no token corpus (registry hook token_corpus); the n-gram "
                        f"baseline needs a family whose data is a token sequence")
    corpus = spec.token_corpus(config)
    started = time.time()
    result = best_order(corpus.train, corpus.validation, int(corpus.tokenizer.vocabulary_size),
                        orders=range(1, max_order + 1))
    per_byte = 1.0 / corpus.bytes_per_validation_token
    return {**result, "best_bits_per_byte": result["best_bits_per_token"] * per_byte,
            "bits_per_byte_by_order": {order: bits * per_byte
                                       for order, bits in result["bits_per_token_by_order"].items()},
            "model": spec.name, "config": dataclasses.asdict(config),
            "tokenizer": type(corpus.tokenizer).__name__, "train_tokens": int(len(corpus.train)),
            "validation_tokens": int(len(corpus.validation)), "validation_bytes": corpus.validation_bytes,
            "seconds": round(time.time() - started, 1),
            "method": "interpolated modified Kneser-Ney (D1, D2, D3+ per order)"}


def baseline_table(report: dict) -> str:
    """Markdown: validation bits/token, perplexity and bits/byte per order, then the best order."""
    lines = ["| order | validation bits/token | perplexity | bits/byte |", "|---|---|---|---|"]
    for order, bits in report["bits_per_token_by_order"].items():
        lines.append(f"| {order} | {bits:.4f} | {2 ** bits:.3f} | {report['bits_per_byte_by_order'][order]:.4f} |")
    lines.append(f"best: order {report['best_order']}, {report['best_bits_per_token']:.4f} bits/token, "
                 f"{report['best_bits_per_byte']:.4f} bits/byte ({report['seconds']:.0f} s for all orders)")
    return "\n".join(lines)
