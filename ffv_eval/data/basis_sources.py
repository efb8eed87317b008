"""Relations for the basis of the composite function vector (CFV): many relations, each a list of
word pairs (input -> output) to train one fine-tuned function vector on.

Sources (all but `project` read from a user-supplied data directory, in their public layouts):

    project   the project's own relations (tasks/relations/pairs/), their *train* split only
    todd      <data_dir>/function_vectors/abstractive/<relation>.json (Todd et al. 2024), minus the
              relations the project already has
    bats      <data_dir>/bats/<category>/<Xnn [name]>.txt, BATS 3.0: word1<TAB>word2[/alt/...]
    google    <data_dir>/google/questions-words.txt (Mikolov et al. 2013): ": category" lines,
              then "a b c d"; each category gives its distinct (a, b) and (c, d) pairs
    semeval   <data_dir>/semeval2012/: SemEval-2012 Task 2, one relation per subcategory (79);
              the pairs with a positive gold prototypicality rating, most prototypical first.
              Ratings come from SemEval-2012-Gold-Ratings/{Training,Testing}/GoldRatings-<id>.txt,
              or, without that package, are computed from the MaxDiff answers of
              SemEval-2012-Complete-Data-Package/{Training,Testing}/Phase2Answers/ the way the
              package's maxdiff_to_scale.pl does (% chosen most - % chosen least illustrative).

Every relation goes through the same steps: strip; drop pairs whose input or output is empty or
has characters other than letters, spaces, hyphens and apostrophes (counted in
`dropped_invalid`); keep the first pair of each input; drop pairs in `exclude` (compared
lower-cased; counted in `dropped_excluded`); skip the relation if fewer than `min_pairs` remain;
keep the first `max_pairs`. The order is deterministic: the project's train order, the seeded
shuffle of relations.seeded_shuffle for todd / bats / google, descending gold rating for semeval.

`exclude` is what no basis relation may train on: a data.test_sets.TestScreen of the test sets
found (what `ffv basis build` passes: normal forms, either order) or a set of lower-cased pairs.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from ffv_eval.data.relations import (
    TODD_SUBDIR,
    RelationDataError,
    WordPair,
    data_dir_from_env,
    load_project_relation,
    project_relations,
    read_pairs,
    seeded_shuffle,
)

SOURCES = ("project", "todd", "bats", "google", "semeval")
BATS_SUBDIR = Path("bats")
GOOGLE_FILE = Path("google") / "questions-words.txt"
SEMEVAL_SUBDIR = Path("semeval2012")
SEMEVAL_PACKAGE = "SemEval-2012-Complete-Data-Package"
SEMEVAL_GOLD_PACKAGE = "SemEval-2012-Gold-Ratings"
SEMEVAL_PARTS = ("Training", "Testing")

# What each source expects under the data directory, for error messages.
EXPECTED = {
    "todd": f"{TODD_SUBDIR}/<relation>.json (Todd et al.'s JSON lists of {{\"input\", \"output\"}})",
    "bats": f"{BATS_SUBDIR}/<category>/<Xnn [relation]>.txt (BATS 3.0, word1<TAB>word2 lines)",
    "google": f"{GOOGLE_FILE} (Mikolov et al.'s ': category' lines, then 'a b c d' lines)",
    "semeval": (
        f"{SEMEVAL_SUBDIR}/{SEMEVAL_PACKAGE}/ (SemEval-2012 Task 2: subcategories-list.txt and "
        f"Phase2Answers/), optionally with {SEMEVAL_SUBDIR}/{SEMEVAL_GOLD_PACKAGE}/"
    ),
}
# The folder (or file) whose absence means the source is not there at all.
SOURCE_PATHS = {"todd": TODD_SUBDIR, "bats": BATS_SUBDIR, "google": GOOGLE_FILE, "semeval": SEMEVAL_SUBDIR}

_APOSTROPHES = "'\u2019"
_GOLD_LINE = re.compile(r'^\s*(-?\d+(?:\.\d+)?)\s+"([^"]*)"\s*$')


@dataclass(frozen=True)
class BasisRelation:
    name: str  # "<source>/<slug>", unique
    source: str  # project | todd | bats | google | semeval
    pairs: tuple[WordPair, ...]  # training pairs, one per input, deterministic order
    origin: str  # the file(s) the pairs came from
    dropped_invalid: int = 0  # pairs with an empty side or characters other than letters, space, - and '
    dropped_excluded: int = 0  # distinct-input pairs removed because they were in `exclude`


def slug(text: str) -> str:
    """'E01 [country - capital]' -> 'e01-country-capital'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def is_clean_word(text: str) -> bool:
    """Non-empty and only letters, spaces, hyphens and apostrophes."""
    return bool(text.strip()) and all(ch.isalpha() or ch in " -" or ch in _APOSTROPHES for ch in text)


# -- the common pipeline ---------------------------------------------------------------------------
def _finish(name, source, pairs, origin, min_pairs, max_pairs, exclude, shuffle=False) -> BasisRelation | None:
    """Clean, keep each input's first pair (in the source's order), shuffle (seeded) if asked,
    exclude, check min_pairs, cap at max_pairs."""
    valid = []
    invalid = 0
    for pair in pairs:
        pair = WordPair(pair.input.strip(), pair.output.strip())
        if is_clean_word(pair.input) and is_clean_word(pair.output):
            valid.append(pair)
        else:
            invalid += 1
    first: dict[str, WordPair] = {}
    for pair in valid:
        first.setdefault(pair.input, pair)
    distinct = list(first.values())
    if shuffle:
        distinct = seeded_shuffle(distinct)
    kept = [p for p in distinct if (p.input.lower(), p.output.lower()) not in exclude]
    if len(kept) < min_pairs:
        return None
    return BasisRelation(name, source, tuple(kept[:max_pairs]), origin, invalid, len(first) - len(kept))


def _source_root(data_dir: Path | None, source: str) -> Path:
    expected = EXPECTED[source]
    if data_dir is None:
        raise RelationDataError(
            f"basis source '{source}': no data directory given; set FFV_DATA_DIR=<dir> or pass data_dir "
            f"with {expected} under <dir>"
        )
    if not data_dir.is_dir():
        raise RelationDataError(f"basis source '{source}': the data directory {data_dir} does not exist (expected {expected} in it)")
    path = data_dir / SOURCE_PATHS[source]
    if not path.exists():
        raise RelationDataError(
            f"basis source '{source}': no {path} in the data directory {data_dir} (expected {expected})"
        )
    return path


# -- project ---------------------------------------------------------------------------------------
def project_train_pairs(name: str) -> tuple[list[WordPair], Path]:
    """The train split of the project's relation `name` and its file, always the project's own
    (load_project_relation: FFV_DATA_DIR would switch load_relation to Todd et al.'s file)."""
    relation = load_project_relation(name)
    return list(relation.train), relation.path


def _project(data_dir, min_pairs, max_pairs, exclude):
    for name in project_relations():
        pairs, path = project_train_pairs(name)
        yield _finish(f"project/{slug(name)}", "project", pairs, str(path), min_pairs, max_pairs, exclude)


# -- Todd et al. -----------------------------------------------------------------------------------
def _todd(data_dir, min_pairs, max_pairs, exclude):
    folder = _source_root(data_dir, "todd")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise RelationDataError(f"basis source 'todd': no *.json files in {folder} (expected {EXPECTED['todd']})")
    # lowercase_first_letter (Todd) is the project's lowercase-first-letter: compare slugs
    project = {slug(name) for name in project_relations()}
    for path in files:
        if slug(path.stem) in project:
            continue
        pairs = read_pairs(path)
        yield _finish(f"todd/{slug(path.stem)}", "todd", pairs, str(path), min_pairs, max_pairs, exclude, shuffle=True)


# -- BATS ------------------------------------------------------------------------------------------
def read_bats_file(path: Path) -> list[WordPair]:
    """word1<TAB>word2 lines; word2 may list alternatives separated by '/' (the first is taken);
    BATS writes multi-word expressions with '_' (read as spaces)."""
    pairs = []
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise RelationDataError(
                f"{path}: line {lineno}: expected 'word1<TAB>word2' (BATS format), got {len(fields)} tab-separated field(s): {line!r}"
            )
        word1 = fields[0].strip()
        word2 = next((alt.strip() for alt in fields[1].split("/") if alt.strip()), "")
        if not word1 or not word2:
            raise RelationDataError(f"{path}: line {lineno}: empty word in {line!r}")
        pairs.append(WordPair(word1.replace("_", " "), word2.replace("_", " ")))
    if not pairs:
        raise RelationDataError(f"{path}: no word pairs in the file (expected word1<TAB>word2 lines)")
    return pairs


def _bats(data_dir, min_pairs, max_pairs, exclude):
    folder = _source_root(data_dir, "bats")
    files = sorted(folder.rglob("*.txt"), key=lambda p: (p.stem.lower(), str(p)))
    if not files:
        raise RelationDataError(f"basis source 'bats': no *.txt files under {folder} (expected {EXPECTED['bats']})")
    for path in files:
        pairs = read_bats_file(path)
        yield _finish(f"bats/{slug(path.stem)}", "bats", pairs, str(path), min_pairs, max_pairs, exclude, shuffle=True)


# -- Google analogies ------------------------------------------------------------------------------
def read_google_categories(path: Path) -> list[tuple[str, list[WordPair], int]]:
    """(category, its distinct (a, b) and (c, d) pairs in order of appearance, line of its header)."""
    categories: list[tuple[str, list[WordPair], int]] = []
    seen: set[tuple[str, str]] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith(":"):
            category = line[1:].strip()
            if not category:
                raise RelationDataError(f"{path}: line {lineno}: empty category name after ':'")
            categories.append((category, [], lineno))
            seen = set()
            continue
        words = line.split()
        if len(words) != 4:
            raise RelationDataError(f"{path}: line {lineno}: expected 4 words 'a b c d', got {len(words)}: {line!r}")
        if not categories:
            raise RelationDataError(f"{path}: line {lineno}: analogy before any ': category' line")
        for pair in ((words[0], words[1]), (words[2], words[3])):
            if pair not in seen:
                seen.add(pair)
                categories[-1][1].append(WordPair(*pair))
    if not categories:
        raise RelationDataError(f"{path}: no ': category' sections in the file")
    return categories


def _google(data_dir, min_pairs, max_pairs, exclude):
    path = _source_root(data_dir, "google")
    if not path.is_file():
        raise RelationDataError(f"basis source 'google': {path} is not a file (expected {EXPECTED['google']})")
    for category, pairs, lineno in read_google_categories(path):
        origin = f"{path}: line {lineno} (: {category})"
        yield _finish(f"google/{slug(category)}", "google", pairs, origin, min_pairs, max_pairs, exclude, shuffle=True)


# -- SemEval-2012 Task 2 ---------------------------------------------------------------------------
def read_semeval_subcategories(path: Path) -> list[tuple[str, str]]:
    """(id such as '1a', slug such as '1a-class-inclusion-taxonomic') from subcategories-list.txt
    ('1, a, CLASS-INCLUSION, Taxonomic' lines)."""
    result = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",", 3)]
        if len(fields) != 4 or not fields[0].isdigit() or not re.fullmatch(r"[a-z]", fields[1]) or not all(fields):
            raise RelationDataError(
                f"{path}: line {lineno}: expected 'number, letter, CLASS, Subcategory', got {line!r}"
            )
        ident = fields[0] + fields[1]
        result.append((ident, slug(f"{ident} {fields[2]} {fields[3]}")))
    if not result:
        raise RelationDataError(f"{path}: no subcategories in the file")
    return result


def _split_semeval_pair(text: str, path: Path, lineno: int) -> WordPair:
    parts = text.split(":")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise RelationDataError(f"{path}: line {lineno}: expected a word pair 'a:b', got {text!r}")
    return WordPair(parts[0].strip(), parts[1].strip())


def read_semeval_gold(path: Path) -> list[tuple[float, WordPair]]:
    """(rating, pair) from a GoldRatings-<id>.txt file (' 50.0 "laugh:happiness"' lines)."""
    rated = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _GOLD_LINE.match(line)
        if not match:
            raise RelationDataError(f"{path}: line {lineno}: expected a rating and a quoted pair ('50.0 \"a:b\"'), got {line!r}")
        rated.append((float(match.group(1)), _split_semeval_pair(match.group(2), path, lineno)))
    return rated


def read_semeval_maxdiff(path: Path) -> list[tuple[float, WordPair]]:
    """(rating, pair) computed from a Phase2Answers-<id>.txt file as maxdiff_to_scale.pl does:
    % of its questions in which the pair was chosen most illustrative minus % least."""
    shown: Counter[str] = Counter()
    most: Counter[str] = Counter()
    least: Counter[str] = Counter()
    where: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip().strip('"') for f in line.split("\t")]
        if len(fields) < 6 or not all(fields[:4]):
            raise RelationDataError(
                f"{path}: line {lineno}: expected 4 quoted pairs, the least and the most illustrative, tab-separated; got {line!r}"
            )
        for pair in fields[:4]:
            shown[pair] += 1
            where.setdefault(pair, lineno)
        # a few answers leave the least or the most illustrative pair empty (""): no vote
        for choice, votes in ((fields[4], least), (fields[5], most)):
            if choice and choice not in fields[:4]:
                raise RelationDataError(f"{path}: line {lineno}: chosen pair {choice!r} is not among the four shown")
            if choice:
                votes[choice] += 1
    return [
        (round(100.0 * (most[p] - least[p]) / n, 1), _split_semeval_pair(p, path, where[p]))
        for p, n in shown.items()
    ]


def _semeval_ratings(root: Path, ident: str) -> tuple[list[tuple[float, WordPair]], Path]:
    for part in SEMEVAL_PARTS:
        gold = root / SEMEVAL_GOLD_PACKAGE / part / f"GoldRatings-{ident}.txt"
        if gold.is_file():
            return read_semeval_gold(gold), gold
    for part in SEMEVAL_PARTS:
        answers = root / SEMEVAL_PACKAGE / part / "Phase2Answers" / f"Phase2Answers-{ident}.txt"
        if answers.is_file():
            return read_semeval_maxdiff(answers), answers
    raise RelationDataError(
        f"SemEval-2012 subcategory {ident}: neither {SEMEVAL_GOLD_PACKAGE}/{{Training,Testing}}/GoldRatings-{ident}.txt "
        f"nor {SEMEVAL_PACKAGE}/{{Training,Testing}}/Phase2Answers/Phase2Answers-{ident}.txt under {root}"
    )


def semeval_rated_subcategories(data_dir) -> list[tuple[str, str, list[tuple[float, WordPair]], Path]]:
    """Every SemEval-2012 subcategory: (id, slug, [(gold prototypicality rating, pair)], file)."""
    root = _source_root(data_dir, "semeval")
    lists = [root / pkg / "subcategories-list.txt" for pkg in (SEMEVAL_PACKAGE, SEMEVAL_GOLD_PACKAGE)]
    list_file = next((p for p in lists if p.is_file()), None)
    if list_file is None:
        raise RelationDataError(
            f"basis source 'semeval': no {lists[0]} (nor {lists[1]}) (expected {EXPECTED['semeval']})"
        )
    return [(ident, name, *_semeval_ratings(root, ident)) for ident, name in read_semeval_subcategories(list_file)]


def _semeval(data_dir, min_pairs, max_pairs, exclude):
    for _ident, name, rated, path in semeval_rated_subcategories(data_dir):
        ranked = sorted((r for r in rated if r[0] > 0), key=lambda r: (-r[0], r[1].input, r[1].output))
        pairs = [pair for _, pair in ranked]
        yield _finish(f"semeval/{name}", "semeval", pairs, str(path), min_pairs, max_pairs, exclude)


_READERS = {"project": _project, "todd": _todd, "bats": _bats, "google": _google, "semeval": _semeval}


def basis_relations(
    data_dir: str | os.PathLike | None,
    sources=SOURCES,
    min_pairs: int = 12,
    max_pairs: int = 80,
    exclude: Container[tuple[str, str]] = frozenset(),
) -> list[BasisRelation]:
    """The basis relations of `sources` (in that order), each with min_pairs..max_pairs pairs.
    data_dir None means $FFV_DATA_DIR; only the `project` source works without a data directory."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in _READERS]
    if unknown:
        raise RelationDataError(f"unknown basis source(s) {', '.join(map(repr, unknown))} (known: {', '.join(SOURCES)})")
    if min_pairs < 1 or max_pairs < min_pairs:
        raise RelationDataError(f"need 1 <= min_pairs <= max_pairs, got min_pairs={min_pairs}, max_pairs={max_pairs}")
    root = data_dir_from_env(data_dir)
    root = Path(root) if root is not None else None
    # a set of pairs is compared lower-cased; a screen (data.test_sets.TestScreen) normalises itself
    excluded = exclude
    if isinstance(exclude, (set, frozenset, list, tuple)):
        excluded = frozenset((a.strip().lower(), b.strip().lower()) for a, b in exclude)
    relations = [
        relation
        for source in sources
        for relation in _READERS[source](root, min_pairs, max_pairs, excluded)
        if relation is not None
    ]
    repeated = [n for n, c in Counter(r.name for r in relations).items() if c > 1]
    if repeated:
        origins = [f"{r.name} from {r.origin}" for r in relations if r.name in repeated]
        raise RelationDataError(f"basis relation names must be unique: {'; '.join(origins)}; rename one of them (a "
                                f"name is <source>/<file or category name>, lower case, '-' for other characters)")
    return relations
