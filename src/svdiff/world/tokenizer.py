"""A CLIP tokenizer for the shapes world, built offline: every world word and every identifier is one token.

The files are the ones CLIP ships (vocab.json, merges.txt); the merges are learned by byte-pair encoding over the
word list until each word is a single symbol, so stock `CLIPTokenizer` reproduces them exactly. All 256 byte symbols
stay in the vocabulary, so any other word still tokenizes (into pieces) instead of failing.
"""

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from .render import world_words

# Rare words that mean nothing to the base model; a subject is bound to one of them by fine-tuning.
IDENTIFIERS = ("sks", "xyz", "zwx", "vyx", "qlo")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties broken alphabetically), until every word is one symbol."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter(p for seq in pieces.values() for p in zip(seq, seq[1:], strict=False))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out


def vocabulary_words() -> list[str]:
    return sorted(set(world_words()) | set(IDENTIFIERS))


def build_tokenizer(out_dir: str | Path, max_length: int = 48) -> CLIPTokenizer:
    """Writes vocab.json and merges.txt into `out_dir` and loads them with stock CLIPTokenizer. 48 positions hold the
    longest caption (two objects, each named with both marks, a size and a place, and the background)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(vocabulary_words())
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=max_length, pad_token=EOS
    )
    return tokenizer
