"""Extend a BPE tokenizer for new languages without changing a single old-language token.

What it does. Given a fast tokenizer's `tokenizer.json`, training text of the new languages and
check text of the old ones, it continues the tokenizer's own BPE: the new text is normalised
and pre-tokenised exactly as the tokenizer does, every pre-token is tokenised with the current
model, and merges of adjacent current tokens are learned greedily (most frequent pair first)
over the word counts. Every new merge is ranked after all existing merges and every new token
id comes after the largest id in use (model vocab and added tokens).

Why old text cannot change. BPE applies the lowest-ranked applicable merge first, so on any
pre-token a tokenizer extended this way first walks exactly the old path and reaches the old
final tokenization; only then may a new merge fire, and the first one to fire needs its two
halves adjacent in that old final tokenization (new tokens have new ids, so no old merge can
use them). Hence: a new merge of two old tokens is refused when that pair is adjacent in the
old-language check texts' final tokenizations (computed per pre-token with the real
tokenizer). The traps the rule alone misses are handled too:
- `ignore_merges` (Llama 3): a pre-token that is itself in the vocab is emitted whole, so a new
  token string equal to an old-language pre-token would change it: such strings are refused.
- A new token must stand for the base tokenization of its own string (its merge parts' base
  tokens, concatenated, equal what the base model makes of the string alone). That makes
  `new_token_sources` the exact old tokens a new token replaces in any text, and it also closes
  the ignore_merges trap by construction: a token equal to an old pre-token would need a first
  merge of two tokens adjacent in that pre-token's old tokenization, which is refused. (On every
  corpus measured this rule refused nothing; the pre-token check stays as a second guard.)
- SentencePiece-style models (Llama 2, Mistral, Gemma) may see the whole text as one "word":
  new tokens follow the base vocabulary's shape (`▁` only as the leading character, no other
  whitespace, digits only if the base merges digits), so no new token spans a word boundary.
- Byte fallback: a character missing from the vocab is spelled with `<0xXX>` tokens, which no
  merge may combine; a new script first gets its characters as new single-character tokens
  (counted against the budget). A character that occurs in any old check text is refused.
- Options that change what a merge means (`dropout`, `continuing_subword_prefix`,
  `end_of_word_suffix`) and non-BPE models are refused; added/special tokens are untouched.
Finally the claim is *checked*, not trusted: every old check text is encoded with the real
extended `tokenizers.Tokenizer` and compared id for id with the base; one difference and the
extension is refused. The guarantee is for text whose adjacent token pairs all occur in the
check texts, so give a generous old-language sample (the pair set costs little memory).

Why hand-written. `tokenizers`' BpeTrainer and SentencePiece train from scratch; neither can
continue an existing merge list with new merges ranked last, nor refuse pairs seen in other
text. So the continuation (plain BPE over word counts with incremental pair counts) lives here;
everything that decides what users' text becomes (normaliser, pre-tokeniser, BPE itself) is
delegated to `tokenizers`, and so is the final verification.

Lifelong use: pass an already extended tokenizer and all earlier languages as old languages.
"""
