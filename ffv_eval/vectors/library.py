"""The vector library on disk: where vectors, bases and composite maps are read and written, and
the composite map's file format. Every other module asks here instead of spelling paths.

Roots: names are looked up in ./vectors of the current working directory first, then in the
shipped library (`ffv_eval.VECTORS_DIR`, inside the installed package, only read). Jobs write
under ./vectors by default. Run in the checkout, both are one folder, so maintainers rebuild
the shipped library in place. Under a root:

    <model>/<kind>/<relation>.safetensors   a vector (+ <relation>.json, its sidecar: vectors.store)
    <model>/basis/<source>/<relation>.safetensors   a basis FFV of the composite vectors
    <model>/basis/composite.safetensors + composite.json   the fitted composite map
    <model>/basis/training_pairs.jsonl      every word pair the basis and its map were made from
    <model>/<file>                          other files of a model (the quality baseline)

The composite map: composite.safetensors holds the tensors "weight" [R, R], "bias" [R] and,
for the calibrated posterior, "relation_baseline" [R]; composite.json (COMPOSITE_FORMAT) the
basis relation names, layer, posterior, temperature, model fingerprint, training data and
metrics. Reading and writing its tensors is here too; what they mean is vectors.composite.

Training pairs: a vector's sidecar lists the word pairs it was made from (field
TRAINING_PAIRS: [[a, b], ...]); a basis keeps them in one JSON-lines file (TRAINING_PAIRS_FILE),
one line per basis relation ({"relation": name, "use": "basis", "pairs": [...]}) and one per
relation whose spare pairs made the map's training analogies ({"use": "map"}). Files made
before pairs were recorded have none: the readers return None, and callers warn that such a
vector cannot be checked for overlap with test data.

Import-light (no torch at import): the reports and the quality gate's pure-Python side use it;
the composite map's tensor functions import safetensors when they are called."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ffv_eval import VECTORS_DIR
from ffv_eval.errors import FFVError
from ffv_eval.files.atomic import atomic_write, atomic_write_text
from ffv_eval.files.json_lines import json_line_objects, json_object

# the kinds of vector a model's library holds, one folder each: the FV, the FFV trained from it
# (whole-answer loss), the same trained on the first answer token only, and from random init
KINDS = ("fv", "ffv", "ffv-first-token", "ffv-random")
BARE_NAME_KINDS = ("ffv", "fv")  # what a bare name (`antonym`) means, in order of preference
VECTOR_SUFFIX = ".safetensors"
BASIS_DIR = "basis"  # <root>/<model>/basis/: a model's basis FFVs and fitted composite map
COMPOSITE_FILE = "composite.safetensors"
COMPOSITE_SIDECAR = "composite.json"
COMPOSITE_FORMAT = "ffv-eval/composite/1"
TRAINING_PAIRS = "training_pairs"  # sidecar field: [[a, b], ...], the pairs a vector was made from
TRAINING_PAIRS_FILE = "training_pairs.jsonl"  # in a basis directory
TRAINING_PAIR_USES = ("basis", "map")
COMPOSITE_FIELDS = ("format", "model_fingerprint", "layer", "temperature", "basis")  # required in composite.json


class BasisError(FFVError, ValueError):
    """A basis directory or composite map that is missing, empty, for another model or unusable."""


# -- roots -----------------------------------------------------------------------------------
def local_vectors_dir() -> Path:
    """./vectors of the current working directory: where jobs write."""
    return Path.cwd() / "vectors"


def vector_roots() -> list[Path]:
    """Where names are looked up, in order: ./vectors, then the shipped library (one root in the
    checkout, where they are the same folder)."""
    local = local_vectors_dir()
    if local.resolve() == VECTORS_DIR.resolve():
        return [VECTORS_DIR]
    return [local, VECTORS_DIR]


def lookup_roots(root: Path | None = None) -> list[Path]:
    """Where a lookup goes: `root` alone when given, else vector_roots()."""
    return [Path(root)] if root is not None else vector_roots()


def read_path(model_alias: str, *parts: str, root: Path | None = None) -> Path:
    """<root>/<model>/<parts...> to read: under `root` when given, else under the first of
    vector_roots() that has it (the shipped one when none has it)."""
    paths = [r.joinpath(model_alias, *parts) for r in lookup_roots(root)]
    return next((p for p in paths if p.exists()), paths[-1])


def write_path(model_alias: str, *parts: str) -> Path:
    """./vectors/<model>/<parts...>: a job's default output."""
    return local_vectors_dir().joinpath(model_alias, *parts)


# -- vectors: <root>/<model>/<kind>/<relation>.safetensors ------------------------------------
def vector_file_name(relation: str) -> str:
    return f"{relation}{VECTOR_SUFFIX}"


def kind_dir(root: Path, model_alias: str, kind: str) -> Path:
    """<root>/<model>/<kind>: the folder of a model's vectors of one kind."""
    return Path(root) / model_alias / kind


def vector_pattern(kind: str) -> str:
    """The path of every vector of a kind, as results record it for a per-task run."""
    return f"vectors/<model>/{kind}/<relation>{VECTOR_SUFFIX}"


def output_path(model_alias: str, kind: str, relation: str) -> Path:
    """A job's default output file: ./vectors/<model>/<kind>/<relation>.safetensors."""
    return write_path(model_alias, kind, vector_file_name(relation))


def shipped_path(model_alias: str, kind: str, relation: str, root: Path | None = None) -> Path:
    """The file of a vector name to read: under `root` when given, else the first of
    vector_roots() that has it (the shipped path when none has it)."""
    return read_path(model_alias, kind, vector_file_name(relation), root=root)


def named_vector_paths(relation: str, kinds: Sequence[str], root: Path | None = None) -> list[Path]:
    """Every model's file of a vector name (`relation` of the first of `kinds` there is), one
    per model folder: the first root that has the model's vector wins (./vectors before the
    shipped library), then the first kind in `kinds`."""
    found: dict[str, Path] = {}
    for r in lookup_roots(root):
        for kind in kinds:
            for path in sorted(r.glob(f"*/{kind}/{vector_file_name(relation)}")):
                found.setdefault(path.parent.parent.name, path)
    return list(found.values())


def known_names(root: Path | None = None) -> list[str]:
    """`<kind>:<relation>` of every vector under the roots (for errors naming what there is)."""
    return sorted({f"{p.parent.name}:{p.stem}" for r in lookup_roots(root) for p in r.glob(f"*/*/*{VECTOR_SUFFIX}")})


def model_vectors(model_alias: str, kind: str, root: Path | None = None) -> list[Path]:
    """Every vector of one kind for a model, one per relation, in file name order: under `root`
    when given, else under the roots (a vector in ./vectors wins over the shipped one of the
    same relation)."""
    found: dict[str, Path] = {}
    for r in lookup_roots(root):
        for path in kind_dir(r, model_alias, kind).glob(f"*{VECTOR_SUFFIX}"):
            found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


def model_dirs(model_alias: str, root: Path | None = None) -> list[Path]:
    """<root>/<model> under `root`, else under each root (for errors naming where one looked)."""
    return [r / model_alias for r in lookup_roots(root)]


def kind_dirs(model_alias: str, kind: str, root: Path | None = None) -> list[Path]:
    """The folders model_vectors reads (for errors naming where it looked)."""
    return [kind_dir(r, model_alias, kind) for r in lookup_roots(root)]


# -- bases and composite maps: <root>/<model>/basis/ ------------------------------------------
def basis_output_dir(model_alias: str) -> Path:
    """Where `ffv basis build` writes by default: ./vectors/<model>/basis."""
    return write_path(model_alias, BASIS_DIR)


def basis_vector_file(directory: Path, relation_name: str) -> Path:
    """A basis FFV in a basis directory (relation names are `<source>/<relation>`)."""
    return Path(directory) / vector_file_name(relation_name)


def composite_files(directory: Path) -> tuple[Path, Path]:
    """(tensors, sidecar) of the composite map in a basis directory."""
    return Path(directory) / COMPOSITE_FILE, Path(directory) / COMPOSITE_SIDECAR


def find_basis_dir(model_alias: str, fingerprint: str | None = None) -> Path | None:
    """The basis directory (with a fitted map) of a model: <root>/<model alias>/basis in the
    order of vector_roots(); else, given the loaded model's fingerprint, any <root>/*/basis whose
    map was fitted on that model (a hub id or a local path of an embedded model). None if none."""
    for root in vector_roots():
        directory = root / model_alias / BASIS_DIR
        if composite_files(directory)[0].is_file():
            return directory
    if fingerprint is not None:
        for root in vector_roots():
            for side in sorted(root.glob(f"*/{BASIS_DIR}/{COMPOSITE_SIDECAR}")):
                try:
                    if json.loads(side.read_text(encoding="utf-8")).get("model_fingerprint") == fingerprint:
                        return side.parent
                except (OSError, ValueError, AttributeError):
                    continue  # an unreadable map is reported when it is loaded by name
    return None


def read_composite_metadata(directory: Path, fingerprint: str | None = None) -> dict:
    """composite.json of the map in a basis directory, checked: both files there, the required
    fields, the format, a non-empty basis, and (given) the loaded model's fingerprint. Errors
    (BasisError) name the file and field."""
    path, side = composite_files(directory)
    if not path.exists() or not side.exists():
        raise BasisError(f"no composite map in {directory} ({COMPOSITE_FILE} + {COMPOSITE_SIDECAR}); run: ffv basis build")
    meta = json_object(side, BasisError, COMPOSITE_FIELDS)
    if meta["format"] != COMPOSITE_FORMAT:
        raise BasisError(f"{side}: field 'format' is {meta['format']!r}, expected {COMPOSITE_FORMAT!r}")
    if not meta["basis"]:
        raise BasisError(f"{side}: field 'basis' is empty: an empty basis cannot compose anything")
    if fingerprint is not None and meta["model_fingerprint"] != fingerprint:
        raise BasisError(f"{side}: composite map built for model fingerprint {meta['model_fingerprint']} "
                         f"({meta.get('model', 'unknown')}), the loaded model is {fingerprint}")
    return meta


def read_composite_tensors(directory: Path, n: int) -> dict:
    """The map's tensors (CPU, as stored): "weight" [n, n] and "bias" [n] checked, and
    "relation_baseline" where there is one."""
    from safetensors.torch import load_file

    path, side = composite_files(directory)
    tensors = load_file(str(path))
    if tensors["weight"].shape != (n, n) or tensors["bias"].shape != (n,):
        raise BasisError(f"{path}: weight/bias shapes {tuple(tensors['weight'].shape)}/{tuple(tensors['bias'].shape)} "
                         f"do not match the {n} basis relations in {side}")
    return tensors


def write_composite_map(directory: Path, meta: dict, tensors: dict) -> Path:
    """Write the map's tensors, then composite.json (`meta`, with the format first), each
    atomically; returns the tensors' file."""
    from safetensors.torch import save_file

    path, side = composite_files(directory)
    atomic_write(path, lambda tmp: save_file({name: t.contiguous() for name, t in tensors.items()}, tmp))
    atomic_write_text(side, json.dumps({"format": COMPOSITE_FORMAT, **meta}, indent=2) + "\n")
    return path


# -- training pairs ----------------------------------------------------------------------------
def _pair_list(value, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) for w in p)
                                              for p in value):
        raise BasisError(f"{where}: expected a list of word pairs [[a, b], ...]")
    return [(a, b) for a, b in value]


def sidecar_training_pairs(metadata: dict, where) -> list[tuple[str, str]] | None:
    """The pairs a stored vector was made from (its sidecar's TRAINING_PAIRS), None if the file
    predates that field."""
    if TRAINING_PAIRS not in metadata:
        return None
    return _pair_list(metadata[TRAINING_PAIRS], f"{where}: field '{TRAINING_PAIRS}'")


def basis_training_pairs(directory: Path) -> dict[str, dict[str, list[tuple[str, str]]]] | None:
    """{use: {relation: pairs}} of a basis directory's TRAINING_PAIRS_FILE, None if it has none."""
    path = Path(directory) / TRAINING_PAIRS_FILE
    if not path.is_file():
        return None
    out: dict[str, dict[str, list[tuple[str, str]]]] = {use: {} for use in TRAINING_PAIR_USES}
    for lineno, line in json_line_objects(path, BasisError):
        where = f"{path}, line {lineno}"
        if not isinstance(line, dict) or line.get("use") not in TRAINING_PAIR_USES or not isinstance(line.get("relation"), str):
            raise BasisError(f"{where}: expected {{\"relation\": name, \"use\": one of {', '.join(TRAINING_PAIR_USES)}, "
                             f"\"pairs\": [[a, b], ...]}}")
        out[line["use"]][line["relation"]] = _pair_list(line.get("pairs"), f"{where}: field 'pairs'")
    return out


def write_basis_training_pairs(directory: Path, pairs: dict[str, dict[str, Sequence[tuple[str, str]]]]) -> Path:
    """Write TRAINING_PAIRS_FILE of a basis directory atomically ({use: {relation: pairs}})."""
    path = Path(directory) / TRAINING_PAIRS_FILE
    lines = [json.dumps({"relation": name, "use": use, "pairs": [list(p) for p in rel_pairs]})
             for use in TRAINING_PAIR_USES for name, rel_pairs in pairs.get(use, {}).items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
