"""Continuing the BPE: greedy merges over the word counts with incremental pair counts, each new merge
ranked after every old one; and the extended tokenizer.json."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass

from layermoe.vocabulary.kinds import (
    R_DECOMPOSITION,
    R_EXISTS,
    R_OLD_ADJACENT,
    R_OLD_CHARACTER,
    R_OLD_PRETOKEN,
    R_SHAPE,
    TokenizerInfo,
    token_text,
)


@dataclass
class NewToken:
    id: int
    string: str
    sources: list[int]  # base token ids it replaces
    parts: tuple[int, ...]  # the two merged ids, or the byte ids of a new character
    is_character: bool
    count: int  # occurrences (new-language training words) when it was learned
    language: str  # the language that used it most when it was learned


class MergeLearner:
    """Greedy BPE over word counts with incremental pair counts.

    words[i] is a list of current token ids, counts[i] its occurrences, langs[i] its language.
    New characters (byte fallback) compete with merges by tokens saved: a character of k bytes
    seen n times saves n*(k-1) tokens, a pair seen n times saves n.
    """

    def __init__(self, words, counts, langs, languages, info, old, base_model, min_count):
        self.words, self.counts, self.langs, self.languages = words, counts, langs, languages
        self.info, self.old, self.base_model, self.min_count = info, old, base_model, min_count
        self.strings = dict(info.id_to_token)
        self.taken = set(info.vocab) | {t for i, t in info.id_to_token.items()}
        self.sources: dict[int, list[int]] = {}
        self.next_id = info.next_id
        self.rejected: Counter = Counter()
        self.dead: set = set()  # candidates rejected once and for all
        self.unmergeable = frozenset(info.byte_ids) | frozenset(info.added_ids)
        self.pair_counts: Counter = Counter()
        self.where: defaultdict = defaultdict(set)
        for i, word in enumerate(words):
            for pair in zip(word, word[1:]):
                self.pair_counts[pair] += counts[i]
                self.where[pair].add(i)
        self.heap = [(-n, pair) for pair, n in self.pair_counts.items() if self._mergeable(pair)]
        heapq.heapify(self.heap)
        self.char_heap, self.char_where = self._character_candidates()

    def _mergeable(self, pair) -> bool:
        """Byte-fallback and added tokens are never merged."""
        return pair[0] not in self.unmergeable and pair[1] not in self.unmergeable

    def _character_candidates(self):
        """Characters spelled with byte tokens in the new text: (heap of (-saved, char, byte ids), where)."""
        if not self.info.byte_fallback:
            return [], {}
        byte_ids = self.info.byte_ids
        value_to_id = {v: i for i, v in byte_ids.items()}
        seen: Counter = Counter()
        where: defaultdict = defaultdict(set)
        for i, word in enumerate(self.words):
            run = []
            for token_id in [*word, None]:
                if token_id in byte_ids:
                    run.append(byte_ids[token_id])
                    continue
                if run:
                    for ch in bytes(run).decode("utf-8", errors="ignore"):
                        seen[ch] += self.counts[i]
                        where[ch].add(i)
                    run = []
        heap = []
        for ch, n in seen.items():
            ids = tuple(value_to_id[b] for b in ch.encode("utf-8"))
            if len(ids) > 1 and n >= self.min_count and not ch.isspace():
                heap.append((-n * (len(ids) - 1), ch, ids, n))
        heapq.heapify(heap)
        return heap, where

    # -- candidate checks --------------------------------------------------------------------
    def _reject(self, key, reason) -> None:
        self.dead.add(key)
        self.rejected[reason] += 1

    def _pair_verdict(self, pair) -> str | None:
        """None when the merge is allowed, else the reason it is not."""
        a, b = pair
        if pair in self.old.adjacent_pairs:
            return R_OLD_ADJACENT
        s = self.strings[a] + self.strings[b]
        if s in self.taken:
            return R_EXISTS
        if not self.info.shape.allows(s, token_text(s, not self.info.byte_fallback)):
            return R_SHAPE
        if self.info.ignore_merges and s in self.old.pretoken_strings:
            return R_OLD_PRETOKEN
        if self.base_model.encode(s, add_special_tokens=False).ids != self._source(a) + self._source(b):
            return R_DECOMPOSITION
        return None

    def _source(self, token_id) -> list[int]:
        return self.sources.get(token_id, [token_id])

    def _best_pair(self):
        """(count, pair) of the most frequent live pair, rejecting forbidden ones on the way."""
        while self.heap:
            neg, pair = self.heap[0]
            if pair in self.dead or self.pair_counts.get(pair, 0) != -neg:
                heapq.heappop(self.heap)  # stale
                continue
            if -neg < self.min_count:
                return None
            reason = self._pair_verdict(pair)
            if reason is None:
                return -neg, pair
            heapq.heappop(self.heap)
            self._reject(pair, reason)
        return None

    def _best_character(self):
        while self.char_heap:
            neg, ch, ids, n = self.char_heap[0]
            if ch in self.old.characters:
                heapq.heappop(self.char_heap)
                self._reject(ch, R_OLD_CHARACTER)
                continue
            if ch in self.taken:
                heapq.heappop(self.char_heap)
                self._reject(ch, R_EXISTS)
                continue
            return -neg, ch, ids, n
        return None

    # -- applying one step -------------------------------------------------------------------
    @staticmethod
    def _replaced(word: list[int], seq: tuple[int, ...], new_id: int) -> tuple[list[int], list[int]]:
        """(word with every non-overlapping occurrence of seq, left to right, replaced by new_id,
        the start positions of those occurrences in the old word)."""
        out, k, starts, n, first = [], 0, [], len(seq), seq[0]
        while True:
            try:
                j = word.index(first, k)
            except ValueError:
                out += word[k:]
                return out, starts
            if tuple(word[j:j + n]) == seq:
                out += word[k:j]
                out.append(new_id)
                k = j + n
                starts.append(j)
            else:
                out += word[k:j + 1]
                k = j + 1

    def _replace_everywhere(self, seq: tuple[int, ...], new_id: int, word_ids) -> Counter:
        """Replace `seq` by `new_id` in the given words, keeping pair counts exact; occurrences per language."""
        if len(seq) == 2:
            per_language, delta = self._merge_pair(seq[0], seq[1], new_id, word_ids)
        else:
            per_language, delta = self._replace_sequence(seq, new_id, word_ids)
        self._apply_pair_deltas(delta)
        return per_language

    def _merge_pair(self, a: int, b: int, c: int, word_ids) -> tuple[Counter, defaultdict]:
        """The hot loop: (a, b) -> c in every listed word, left to right, non-overlapping, with the
        pair-count changes collected as it goes (only neighbours of a merge change)."""
        per_language: Counter = Counter()
        delta: defaultdict = defaultdict(int)
        words, counts, langs, where = self.words, self.counts, self.langs, self.where
        for i in word_ids:
            word = words[i]
            n = len(word)
            out, k, hits = [], 0, 0
            cnt = counts[i]
            while True:
                try:
                    j = word.index(a, k)
                except ValueError:
                    break
                if j + 1 == n or word[j + 1] != b:
                    out += word[k:j + 1]
                    k = j + 1
                    continue
                out += word[k:j]
                hits += 1
                if out:  # left neighbour: (w[j-1], a) becomes (out[-1], c); after a hit w[j-1] is b
                    left = out[-1]
                    delta[word[j - 1], a] -= cnt
                    delta[left, c] += cnt
                    where[left, c].add(i)
                if j + 2 < n and not (word[j + 2] == a and j + 3 < n and word[j + 3] == b):
                    right = word[j + 2]  # (the next hit's left side handles a directly following hit)
                    delta[b, right] -= cnt
                    delta[c, right] += cnt
                    where[c, right].add(i)
                out.append(c)
                k = j + 2
            if not hits:
                continue  # stale index
            out += word[k:]
            delta[a, b] -= hits * cnt
            words[i] = out
            per_language[langs[i]] += hits * cnt
        return per_language, delta

    def _replace_sequence(self, seq: tuple[int, ...], new_id: int, word_ids) -> tuple[Counter, defaultdict]:
        """General replacement (a new character's byte tokens): old pairs out, new pairs in, per word."""
        per_language: Counter = Counter()
        delta: defaultdict = defaultdict(int)
        for i in word_ids:
            word = self.words[i]
            out, starts = self._replaced(word, seq, new_id)
            if not starts:
                continue  # stale index
            c = self.counts[i]
            for pair in zip(word, word[1:]):
                delta[pair] -= c
            for pair in zip(out, out[1:]):
                delta[pair] += c
                if new_id in pair:
                    self.where[pair].add(i)
            self.words[i] = out
            per_language[self.langs[i]] += len(starts) * c
        return per_language, delta

    def _apply_pair_deltas(self, delta) -> None:
        for pair, d in delta.items():
            if not d:
                continue
            n_pair = self.pair_counts.get(pair, 0) + d
            if n_pair <= 0:
                self.pair_counts.pop(pair, None)
                self.where.pop(pair, None)
                continue
            self.pair_counts[pair] = n_pair
            if pair not in self.dead and self._mergeable(pair):
                heapq.heappush(self.heap, (-n_pair, pair))

    def _add(self, string, parts, sources, is_character, count, word_ids) -> NewToken:
        new_id = self.next_id
        self.next_id += 1
        self.strings[new_id] = string
        self.taken.add(string)
        self.sources[new_id] = sources
        per_language = self._replace_everywhere(parts, new_id, word_ids)
        language = self.languages[per_language.most_common(1)[0][0]] if per_language else ""
        return NewToken(new_id, string, sources, parts, is_character, count, language)

    def learn(self, max_new: int) -> list[NewToken]:
        learned: list[NewToken] = []
        while len(learned) < max_new:
            pair = self._best_pair()
            char = self._best_character()
            if pair is None and char is None:
                break
            if char is not None and (pair is None or char[0] > pair[0]):
                heapq.heappop(self.char_heap)
                _, ch, ids, n = char
                learned.append(self._add(ch, ids, list(ids), True, n, self.char_where.pop(ch)))
            else:
                count, (a, b) = pair
                word_ids = list(self.where.pop((a, b)))
                learned.append(self._add(self.strings[a] + self.strings[b], (a, b),
                                         self._source(a) + self._source(b), False, count, word_ids))
                self.dead.add((a, b))
        return learned


# ---------------------------------------------------------------------------------------------
# Writing the extended tokenizer.json


def extended_tokenizer_json(base_json: dict, info: TokenizerInfo, learned: list[NewToken], id_to_string: dict[int, str]) -> dict:
    """The base tokenizer.json with the new tokens in the vocab and the new merges appended last."""
    model = {**base_json["model"], "vocab": dict(base_json["model"]["vocab"]),
             "merges": list(base_json["model"].get("merges") or [])}  # the base stays untouched
    extended = {**base_json, "model": model}
    used_ids = set(model["vocab"].values())
    for added in extended.get("added_tokens") or []:
        # tokenizers re-numbers, on loading, every added token missing from the model vocab from
        # the model vocab's *size* on (Llama 3's specials sit after the vocab): with new tokens in
        # the vocab they would take new ids. In the vocab at their own ids they keep them.
        if added["content"] not in model["vocab"] and added["id"] not in used_ids:
            model["vocab"][added["content"]] = added["id"]
            used_ids.add(added["id"])
    for token in learned:
        model["vocab"][token.string] = token.id
    new_merges = [(id_to_string[t.parts[0]], id_to_string[t.parts[1]]) for t in learned if not t.is_character]
    merges = model["merges"]
    if info.merges_as_strings and any(" " in a or " " in b for a, b in new_merges):
        merges[:] = [m.split(" ", 1) for m in merges]  # "a b" cannot hold a space: use pairs
        info.merges_as_strings = False
    merges += [f"{a} {b}" if info.merges_as_strings else [a, b] for a, b in new_merges]
    return extended


# ---------------------------------------------------------------------------------------------
