"""An embedded, generated text corpus so the default experiment needs no download.

Five "domains" with learnable structure, interleaved line by line: template sentences, integer
addition, key-value records, counting runs and a bracket language. A model must learn spelling,
grammar, carrying digits and matching brackets, so loss falls visibly in minutes; the domains
also give experts something to specialise on (useful to the analysis tools later).
Deterministic given the seed.
"""
from __future__ import annotations

import numpy as np

_ADJ = "quick lazy red small bright old young quiet brave clever tired happy".split()
_NOUN = "fox dog cat bird king queen river city farmer child sailor robot".split()
_VERB = "sees finds helps follows paints chases greets watches calls remembers".split()
_NAMES = "ada alan grace linus barbara ken dennis margaret edsger donald".split()
_CITIES = "paris tokyo lima cairo oslo delhi quito rome seoul perth".split()


def _sentence(r):
  pick = lambda xs: xs[r.integers(len(xs))]
  return (f"the {pick(_ADJ)} {pick(_NOUN)} {pick(_VERB)} the {pick(_ADJ)} {pick(_NOUN)}"
          f"{' and ' + pick(_VERB) + ' the ' + pick(_NOUN) if r.random() < 0.3 else ''}.")


def _addition(r):
  a, b = r.integers(0, 1000, size=2)
  return f"{a} + {b} = {a + b}"


def _record(r):
  return (f"name: {_NAMES[r.integers(len(_NAMES))]}; age: {r.integers(18, 90)}; "
          f"city: {_CITIES[r.integers(len(_CITIES))]}")


def _counting(r):
  start, step = r.integers(0, 50), r.integers(1, 4)
  return "count: " + " ".join(str(start + i * step) for i in range(r.integers(4, 9)))


def _brackets(r, depth=0):
  out = []
  for _ in range(r.integers(1, 4)):
    o, c = "([{"[r.integers(3)], None
    c = {"(": ")", "[": "]", "{": "}"}[o]
    inner = _brackets(r, depth + 1) if depth < 3 and r.random() < 0.5 else ""
    out.append(o + inner + c)
  return "".join(out)


_DOMAINS = (_sentence, _addition, _record, _counting, lambda r: "nest: " + _brackets(r))


def generate_corpus(num_bytes: int, seed: int = 0) -> str:
  """Returns at least ``num_bytes`` of ASCII text, one domain sample per line."""
  r = np.random.default_rng(seed)
  lines, size = [], 0
  while size < num_bytes:
    line = _DOMAINS[r.integers(len(_DOMAINS))](r) + "\n"
    lines.append(line)
    size += len(line)
  return "".join(lines)
