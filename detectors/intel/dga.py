"""A score for algorithmically generated domain names (DGA), for names no list knows.

Malware with a domain generation algorithm registers (and looks up) names
like ``mfffpmgtplxbyagbtegh.com`` or ``1hyzmw3l2phycet88hzr2do34.net``: the
characters follow each other the way random letters do, not the way people
name things. The score is the mean surprise (bits per character) of the
name's characters under a character-trigram model of names people chose
(PyPI project names: 880,000 human-made names, words run together, hyphens,
digits), with the length and the share of digits as the other signals.

What keeps it quiet on ordinary traffic:
- only the *registrable* label is scored: the one left of the public suffix
  (``d1234abcd.cloudfront.net`` is scored as ``cloudfront``; the hash-like
  host names of CDNs, S3, ECR, ELB and EC2 are below a public suffix the
  provider owns). Names without a known public suffix (``.internal``,
  ``.local``, k8s/ECS service names, bare host names) are never scored;
- labels shorter than :data:`MIN_LABEL` are not scored (too few characters to
  tell ``xkcd`` from a DGA);
- the threshold is set on measured rates (``python -m detectors.intel.dga``
  prints them): see :data:`THRESHOLD`.

Dictionary DGAs (words run together: ``surfaces-drawing.com``) are not seen
by any character model; their published names are on the bundled dga list.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

ALPHABET = "^$-0abcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
N = len(ALPHABET)
MIN_LABEL = 8
# Bits per character above which a name is called generated (set on the measurements in SOURCES.md).
THRESHOLD = 4.2
# Share of a label's characters that known words (of 3+ letters) cover, below which it can be generated.
MAX_WORD_COVER = 0.5
# Private-section suffixes where anyone picks the name for free: DGAs register there (corebot, symmi, kraken).
DYNAMIC_DNS = frozenset(
    {
        "ddns.net",
        "duckdns.org",
        "dyndns.org",
        "mooo.com",
        "yi.org",
        "dynserv.com",
        "hopto.org",
        "zapto.org",
        "sytes.net",
        "no-ip.org",
        "no-ip.biz",
        "no-ip.info",
        "servehttp.com",
        "serveftp.com",
        "myftp.org",
        "myvnc.com",
        "redirectme.net",
        "dynu.net",
        "freeddns.org",
        "ddnsking.com",
        "3utilities.com",
        "bounceme.net",
        "gotdns.ch",
        "servebeer.com",
        "serveblog.net",
        "webhop.me",
    }
)


def _symbols(label: str) -> list[int]:
    out = [0, 0]
    for ch in label:
        if "0" <= ch <= "9":
            out.append(_INDEX["0"])
        else:
            idx = _INDEX.get(ch)
            out.append(idx if idx is not None else _INDEX["-"])
    out.append(1)
    return out


@dataclass(frozen=True, slots=True)
class Score:
    label: str  # the label scored ("" when not scored)
    bits: float  # mean surprise per character
    generated: bool
    reason: str  # why not scored, or the figures

    def __str__(self) -> str:
        return self.reason


class TrigramModel:
    """log2 P(c | two previous) for every trigram of :data:`ALPHABET`, add-k smoothed."""

    def __init__(self, logp: Sequence[float]) -> None:
        if len(logp) != N**3:
            raise ValueError(f"trigram table has {len(logp)} entries, not {N**3}")
        self.logp = list(logp)

    @classmethod
    def train(cls, names: Iterable[str], k: float = 0.05) -> TrigramModel:
        counts = [0.0] * (N**3)
        for name in names:
            s = _symbols(name)
            for i in range(2, len(s)):
                counts[(s[i - 2] * N + s[i - 1]) * N + s[i]] += 1
        logp: list[float] = []
        for ctx in range(N * N):
            row = counts[ctx * N : (ctx + 1) * N]
            total = sum(row) + k * N
            logp.extend(round(math.log2((c + k) / total), 3) for c in row)
        return cls(logp)

    def bits(self, label: str) -> float:
        s = _symbols(label)
        lp = self.logp
        total = 0.0
        for i in range(2, len(s)):
            total -= lp[(s[i - 2] * N + s[i - 1]) * N + s[i]]
        return total / (len(s) - 2)


class PublicSuffixes:
    """The public suffix list (ICANN and private sections): which part of a name is registrable."""

    def __init__(self, text: str) -> None:
        self.rules: set[str] = set()
        self.wild: set[str] = set()
        self.exceptions: set[str] = set()
        # suffixes of the PRIVATE section: owned by a provider (cloudfront.net, s3.amazonaws.com, herokuapp.com)
        self.private: set[str] = set()
        private = False
        for raw in text.splitlines():
            if "===BEGIN PRIVATE DOMAINS===" in raw:
                private = True
            line = raw.strip().split(" ", 1)[0]
            if not line or line.startswith("//"):
                continue
            if private:
                self.private.add(line.lstrip("!").removeprefix("*.").lower())
            line = line.encode("idna").decode("ascii") if not line.isascii() else line
            if line.startswith("!"):
                self.exceptions.add(line[1:].lower())
            elif line.startswith("*."):
                self.wild.add(line[2:].lower())
            else:
                self.rules.add(line.lower())

    def split(self, name: str) -> tuple[str, str] | None:
        """(registrable label, public suffix) of a normalized name; None when no public suffix matches."""
        labels = name.split(".")
        for i in range(len(labels)):
            cand = ".".join(labels[i:])
            if cand in self.exceptions:
                suffix_at = i + 1
            elif cand in self.rules or (i + 1 < len(labels) and ".".join(labels[i + 1 :]) in self.wild):
                suffix_at = i
            else:
                continue
            if suffix_at == 0:
                return None  # the name is itself a public suffix
            return labels[suffix_at - 1], ".".join(labels[suffix_at:])
        return None


@functools.cache
def public_suffixes() -> PublicSuffixes:
    return PublicSuffixes(_data("public_suffix_list.dat"))


@functools.cache
def model() -> TrigramModel:
    return TrigramModel(json.loads(_data("dga_trigrams.json"))["logp"])


@functools.cache
def words() -> frozenset[str]:
    return frozenset(w for w in _data("dga_words.txt").split() if not w.startswith("#"))


def word_cover(text: str) -> float:
    """Share of ``text``'s characters inside known words of 3+ letters (best segmentation, dynamic programming)."""
    vocab = words()
    n = len(text)
    if n == 0:
        return 0.0
    best = [0] * (n + 1)
    for i in range(1, n + 1):
        best[i] = best[i - 1]
        for j in range(max(0, i - 20), i - 2):
            if text[j:i] in vocab and best[j] + (i - j) > best[i]:
                best[i] = best[j] + (i - j)
    return best[n] / n


def _data(name: str) -> str:
    return (resources.files("detectors.intel") / "data" / name).read_text(encoding="utf-8")


def score(name: str, *, threshold: float = THRESHOLD) -> Score:
    """How generated the registrable label of ``name`` (normalized: lower case, no final dot) looks."""
    split = public_suffixes().split(name)
    if split is None:
        return Score("", 0.0, False, "no public suffix")
    label, suffix = split
    # Below a provider's suffix the provider names the hosts (d1234abcd.cloudfront.net, S3, ELB, ECR hosts):
    # hash-like by design. Only dynamic-DNS providers let anyone pick the name, and DGAs use them.
    if suffix in public_suffixes().private and suffix not in DYNAMIC_DNS:
        return Score(label, 0.0, False, f"host name chosen by the provider of {suffix}")
    return score_label(label, threshold=threshold)


def score_label(label: str, *, threshold: float = THRESHOLD) -> Score:
    """The score of one registrable label (``score`` finds it in a name)."""
    if label.startswith("xn--"):
        return Score(label, 0.0, False, "internationalized name")
    # hyphenated names are scored part by part: "is-a-chef", "eu-west-1" are words and codes, not a sequence
    parts = [p for p in label.split("-") if len(p) >= MIN_LABEL]
    if not parts:
        return Score(label, 0.0, False, "label too short")
    m = model()
    best: tuple[float, float, str] | None = None
    for part in parts:
        bits = m.bits(part)
        digits = sum(ch.isdigit() for ch in part)
        # a long label mixing letters and digits throughout (newgoz, qadars) is surprising on both counts
        if digits and len(part) >= 12 and 0.2 <= digits / len(part) <= 0.8:
            bits += 0.5
        if best is None or bits > best[0]:
            best = (bits, word_cover(part), part)
    assert best is not None
    bits, cover, part = best
    generated = bits >= threshold and cover < MAX_WORD_COVER
    return Score(label, bits, generated, f"{bits:.2f} bits/char, {cover:.0%} words in {part!r} (threshold {threshold})")


# -- training and measuring (offline; the table is committed) ---------------------------------------------------


def _pypi_names(path: str) -> list[str]:
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        next(f, None)
        for line in f:
            name = line.split("\t", 1)[0].strip().lower().replace("_", "-").replace(".", "-")
            if len(name) >= 3 and all(c in _INDEX or c.isdigit() for c in name):
                out.append(name)
    return out


def main(argv: Sequence[str]) -> int:
    """``python -m detectors.intel.dga train PYPI_TSV OUT_JSON`` or ``... measure`` (rates on bundled data)."""
    if argv[:1] == ["train"] and len(argv) == 3:
        names = _pypi_names(argv[1])
        # every tenth name is held out for measuring the false-positive rate
        train = [n for i, n in enumerate(names) if i % 10]
        m = TrigramModel.train(train)
        with open(argv[2], "w", encoding="utf-8") as f:
            json.dump({"alphabet": ALPHABET, "trained_on": f"{len(train)} PyPI project names", "logp": m.logp}, f)
        # words: name parts of 3+ letters used by at least 8 projects
        counts: dict[str, int] = {}
        for n in train:
            for t in set(n.replace("0", "-").split("-")):
                if len(t) >= 3 and t.isalpha():
                    counts[t] = counts.get(t, 0) + 1
        vocab = sorted(w for w, k in counts.items() if k >= 8)
        with open(os.path.join(os.path.dirname(argv[2]), "dga_words.txt"), "w", encoding="utf-8") as f:
            f.write("# words of PyPI project names (3+ letters, in 8+ names), for dga.word_cover\n")
            f.write("\n".join(vocab) + "\n")
        print(f"trained on {len(train)} names, {len(vocab)} words")
        return 0
    if argv[:1] == ["measure"]:
        for line in measure_report():
            print(line)
        return 0
    print(main.__doc__)
    return 2


def measure_report() -> list[str]:
    dga = family_domains()
    out = []
    scored = [(d, fam, score(d)) for d, fam in dga if "dictionary" not in fam]
    hits = sum(s.generated for _, _, s in scored)
    long_enough = [s for _, _, s in scored if s.label and len(s.label) >= MIN_LABEL]
    out.append(
        f"DGA family names (character DGAs): {hits}/{len(scored)} flagged; "
        f"of those with a label >= {MIN_LABEL} chars: {sum(s.generated for s in long_enough)}/{len(long_enough)}"
    )
    benign = benign_psl_names()
    labels = [n.split(".", 1)[0] for n in benign]
    fps = [n for n in labels if score_label(n).generated]
    long = [n for n in labels if len(n) >= MIN_LABEL]
    out.append(
        f"public suffix list owners' labels: {len(fps)}/{len(labels)} flagged "
        f"({100 * len(fps) / max(1, len(labels)):.2f}%; {len(long)} long enough to be scored)"
    )
    out.extend(f"  false positive: {n} {score_label(n)}" for n in fps[:40])
    return out


def family_domains() -> list[tuple[str, str]]:
    """(domain, family) of the bundled DGA family list."""
    from detectors.intel.loaders import Indicator, read_list

    out: list[tuple[str, str]] = []
    for ind in read_list("dga_families.txt", _data("dga_families.txt"), "plain"):
        if isinstance(ind, Indicator) and ind.kind == "domain":
            out.append((str(ind.value), ind.threat_name or ""))
    return out


def benign_psl_names() -> list[str]:
    """Real registered names from the public suffix list: its private section's domains, as ``label.suffix``."""
    psl = public_suffixes()
    text = _data("public_suffix_list.dat")
    private = text.split("===BEGIN PRIVATE DOMAINS===", 1)[-1]
    names: set[str] = set()
    for raw in private.splitlines():
        line = raw.strip()
        if not line or line.startswith("//") or line.startswith("!"):
            continue
        line = line.removeprefix("*.").lower()
        if not line.isascii():
            continue
        labels = line.split(".")
        # the owner's registered domain: the label right of the shortest ICANN-looking suffix that is listed
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if parent in psl.rules and parent.count(".") <= 1 and i >= 1:
                names.add(".".join(labels[i - 1 :]))
                break
    return sorted(names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
