"""Write ``tests/data/corpus.jsonl``: the fixed corpus behind the golden curves (run once).

The checked-in ``corpus.jsonl`` is the source of truth; this script records how it
was made. Every word comes from the lists below, written for megalm (no third-party
text, nothing read from the machine), and the choices come from a 64-bit
xorshift generator of our own, so the output does not depend on the Python
version's ``random``. Three kinds of documents, so a tiny model has something to
learn in 20 steps and ``training.sample_prompt="def "`` makes sense:

- village chronicles: sentences from a small grammar (who, did what, where, when);
- Python-like functions from templates (names, arguments, arithmetic, loops);
- arithmetic tables (``17 + 25 = 42``), whose answers are always right.

Usage: ``python tests/data/make_corpus.py`` (rewrites ``tests/data/corpus.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("corpus.jsonl")
SEED = 0x5EED_0F_601DE7
DOCUMENTS = 640

NAMES = "Alda Brin Cato Dela Eswin Fenna Garo Hesta Ivo Jorun Kel Liss Maro Nessa Orrin Pell".split()
TRADES = "miller weaver smith potter baker carter fisher mason cooper tanner brewer shepherd".split()
PLACES = "Aldwick Bramford Cray Dunmere Eastholt Fellbrook Greywater Hollin Ives Kettlemoor".split()
THINGS = "geese barrels nets bricks loaves bowls ropes lanterns bells candles sacks baskets".split()
COLOURS = "grey red brown white green black yellow blue".split()
COUNTS = "two three four five six seven eight nine ten eleven twelve".split()
VERBS = "mended sold carried counted painted traded stacked washed bought found".split()
TIMES = "at dawn|before noon|in the evening|on market day|after the rain|in spring|in winter".split("|")
WEATHER = "The river was high|The road was dry|The wind came from the hills|Snow lay on the roofs".split("|")
FUNCS = "total scale offset clamp mix step count merge split shift fold score".split()
ARGS = "x y n k a b size count left right value weight".split()


class XorShift:
    """xorshift64* (Marsaglia 2003; Vigna 2016): ``x ^= x >> 12; x ^= x << 25; x ^= x >> 27``,
    output the high 32 bits of ``x * 0x2545F4914F6CDD1D`` mod 2^64."""

    def __init__(self, seed: int) -> None:
        self.x = seed & (2**64 - 1) or 1

    def next(self) -> int:
        x = self.x
        x ^= x >> 12
        x ^= (x << 25) & (2**64 - 1)
        x ^= x >> 27
        self.x = x
        return ((x * 0x2545F4914F6CDD1D) & (2**64 - 1)) >> 32

    def below(self, n: int) -> int:
        return self.next() % n

    def pick(self, items: list[str]) -> str:
        return items[self.below(len(items))]


def chronicle(rng: XorShift) -> str:
    place = rng.pick(PLACES)
    lines = [f"A chronicle of {place}.", ""]
    for _ in range(6 + rng.below(10)):
        who, trade = rng.pick(NAMES), rng.pick(TRADES)
        n, colour, thing = rng.pick(COUNTS), rng.pick(COLOURS), rng.pick(THINGS)
        kind = rng.below(4)
        if kind == 0:
            lines.append(f"{who} the {trade} {rng.pick(VERBS)} {n} {colour} {thing} {rng.pick(TIMES)}.")
        elif kind == 1:
            lines.append(f"{rng.pick(WEATHER)}, so {who} stayed in {place} and {rng.pick(VERBS)} the {thing}.")
        elif kind == 2:
            other = rng.pick([p for p in PLACES if p != place])
            lines.append(f"{who} walked from {place} to {other} with {n} {thing} for the {rng.pick(TRADES)}.")
        else:
            lines.append(f"Every {trade} in {place} keeps {n} {colour} {thing}, said {who}.")
    return "\n".join(lines) + "\n"


def function(rng: XorShift) -> str:
    name = f"{rng.pick(FUNCS)}_{rng.pick(FUNCS)}"
    a, b = rng.pick(ARGS), rng.pick(ARGS)
    while b == a:
        b = rng.pick(ARGS)
    c = 1 + rng.below(9)
    kind = rng.below(3)
    if kind == 0:
        body = f"    return {a} * {c} + {b}\n"
    elif kind == 1:
        body = f"    out = 0\n    for i in range({a}):\n        out += i * {c}\n    return out + {b}\n"
    else:
        body = f"    if {a} > {b}:\n        return {a} - {b}\n    return {b} - {a} + {c}\n"
    doc = f'def {name}({a}, {b}):\n    """{name.replace("_", " ")} of {a} and {b}."""\n{body}'
    calls = [f"assert {name}({1 + rng.below(20)}, {1 + rng.below(20)}) >= 0" for _ in range(2)]
    return doc + "\n\n" + "\n".join(calls) + "\n"


def table(rng: XorShift) -> str:
    op = rng.pick(["+", "-", "*"])
    lines = [f"# table of {op}"]
    for _ in range(12 + rng.below(12)):
        x, y = rng.below(50), rng.below(50)
        z = x + y if op == "+" else x - y if op == "-" else x * y
        lines.append(f"{x} {op} {y} = {z}")
    return "\n".join(lines) + "\n"


def documents(n: int = DOCUMENTS, seed: int = SEED) -> list[str]:
    """``n`` documents; chronicles twice as often as functions and tables."""
    rng = XorShift(seed)
    makers = [chronicle, chronicle, function, table]
    return [makers[rng.below(len(makers))](rng) for _ in range(n)]


def main() -> None:
    docs = documents()
    with open(OUT, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    print(f"wrote {OUT}: {len(docs)} documents, {OUT.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
