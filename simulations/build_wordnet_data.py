"""Build the demo's per-client JSONL partitions from WordNet 3.0.

Each client is one WordNet *lexicographer file* (a topic: ``noun.animal``,
``noun.food``, ``verb.motion`` ...), so the split across clients is natural and
non-IID: every device knows the vocabulary of its own domain only.

Two kinds of records per synset, both human-written by WordNet's lexicographers:

* ``Define "X".`` -> the synset's gloss (definition part, without usage examples);
* ``What kind of thing is "X"?`` -> ``"X" is a kind of Y.`` (Y = first hypernym lemma),
  only for nouns that have a hypernym.

The train and held-out files are split *by synset*, and no record appears twice.

This is a development-time script: it needs Debian's ``wordnet-base``
(``apt-get install wordnet-base``) and writes the processed files that are
committed under ``simulations/data/wordnet/``, so the main job needs no apt.

Usage::

    python simulations/build_wordnet_data.py [--wordnet-dir /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# WordNet's lexicographer file numbers (wndb(5) "lexnames"), restricted to the topics we ship.
TOPICS: dict[int, str] = {
    5: "noun.animal",
    6: "noun.artifact",
    8: "noun.body",
    13: "noun.food",
    18: "noun.person",
    20: "noun.plant",
    32: "verb.communication",
    38: "verb.motion",
}
TRAIN_PER_TOPIC = 500
HELDOUT_PER_TOPIC = 200
SEED = 20261124


def _lemma(word: str) -> str:
    """WordNet lemmas use underscores for spaces and may carry a ``(a)``-style marker."""
    return word.split("(")[0].replace("_", " ")


def _definition(gloss: str) -> str:
    """Keep the definition part of a gloss, drop the quoted usage examples."""
    parts = [p.strip() for p in gloss.split(";")]
    kept = [p for p in parts if p and not p.startswith('"')]
    text = "; ".join(kept).strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".") if text else ""


def parse_data_file(path: Path) -> dict[str, dict]:
    """Parse a ``data.noun`` / ``data.verb`` file into ``offset -> synset``."""
    synsets: dict[str, dict] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        offset, lexfile, pos = fields[0], int(fields[1]), fields[2]
        n_words = int(fields[3], 16)
        words = [_lemma(fields[4 + 2 * i]) for i in range(n_words)]
        i = 4 + 2 * n_words
        n_ptr = int(fields[i])
        hypernyms = []
        for k in range(n_ptr):
            symbol, target = fields[i + 1 + 4 * k], fields[i + 2 + 4 * k]
            if symbol in ("@", "@i"):
                hypernyms.append(target)
        synsets[offset] = {
            "lexfile": lexfile,
            "pos": pos,
            "words": words,
            "hypernyms": hypernyms,
            "definition": _definition(gloss.strip()),
        }
    return synsets


def records_for(synset: dict, all_synsets: dict[str, dict]) -> list[dict]:
    """Chat records (``messages`` format) that one synset yields."""
    word = synset["words"][0]
    out = []
    if synset["definition"]:
        kind = "the verb " if synset["pos"] == "v" else ""
        out.append(_chat(f'Define {kind}"{word}".', synset["definition"]))
    if synset["pos"] == "n" and synset["hypernyms"]:
        parent = all_synsets.get(synset["hypernyms"][0])
        if parent is not None:
            out.append(_chat(f'What kind of thing is "{word}"?', f'"{word}" is a kind of {parent["words"][0]}.'))
    return out


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(wordnet_dir: Path, out_dir: Path) -> None:
    """Write ``<topic>/train.jsonl`` and ``<topic>/heldout.jsonl`` for every topic."""
    synsets: dict[str, dict] = {}
    for pos in ("noun", "verb"):
        synsets.update({f"{pos}:{k}": v for k, v in parse_data_file(wordnet_dir / f"data.{pos}").items()})
    # hypernym pointers are offsets within the same part of speech
    by_offset = {k.split(":")[1] + ("n" if k.startswith("noun") else "v"): v for k, v in synsets.items()}
    resolved = {k: {**v, "hypernyms": [h + v["pos"] for h in v["hypernyms"]]} for k, v in synsets.items()}
    rng = random.Random(SEED)
    for lexfile, topic in TOPICS.items():
        members = sorted(k for k, v in resolved.items() if v["lexfile"] == lexfile)
        rng.shuffle(members)
        train: list[dict] = []
        heldout: list[dict] = []
        seen: set[str] = set()  # distinct synsets can yield the same record ("Gregory" is a kind of pope, x16)
        for key in members:
            target = heldout if len(heldout) < HELDOUT_PER_TOPIC else train
            for record in records_for(resolved[key], by_offset):
                text = json.dumps(record, sort_keys=True)
                if text not in seen:
                    seen.add(text)
                    target.append(record)
            if len(train) >= TRAIN_PER_TOPIC:
                break
        topic_dir = out_dir / topic
        topic_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train[:TRAIN_PER_TOPIC]), ("heldout", heldout[:HELDOUT_PER_TOPIC])):
            with (topic_dir / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{topic:20s} train={min(len(train), TRAIN_PER_TOPIC)} heldout={min(len(heldout), HELDOUT_PER_TOPIC)}")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "data" / "wordnet")
    args = parser.parse_args()
    build(args.wordnet_dir, args.out_dir)


if __name__ == "__main__":
    main()
