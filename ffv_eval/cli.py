"""The `ffv` command line: a thin layer over the library modules."""

from __future__ import annotations

import argparse
import sys

from ffv_eval import DEFAULT_MODEL
from ffv_eval.errors import FFVError
from ffv_eval.vectors.library import KINDS


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --device-map: where and in which dtype a subcommand's model runs (the
    one home of these arguments; models.loading.Placement validates them)."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu); not with --device-map")
    parser.add_argument("--dtype",
                        help="auto (the checkpoint's own, the default), float32, bfloat16 or float16: the model's weights "
                             "and activations; vectors stay float32")
    parser.add_argument("--device-map", default=None,
                        help="accelerate's placement across the GPUs (and CPU), e.g. auto, instead of one --device")


def placement_of(args):
    """The validated placement of parsed arguments (errors before any model work)."""
    from ffv_eval.models.loading import Placement

    return Placement(**_given(device=args.device, dtype=args.dtype, device_map=args.device_map)).checked()


def _margin(text: str) -> float | None:
    """A --no-relation margin: a number of nats, or none (no such option)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of nats or none") from None


def _given(**options) -> dict:
    """The options given on the command line. The others are None (their arguments have no
    default here), so the settings dataclass or job function they go to applies its own default:
    each default has one home."""
    return {name: value for name, value in options.items() if value is not None}


def _extract(args) -> None:
    from ffv_eval.vectors.function_vectors import ExtractionSettings
    from ffv_eval.vectors.jobs import extract_and_save

    settings = ExtractionSettings(**_given(
        n_shots=args.shots, n_mean_prompts=args.mean_prompts, n_effect_prompts=args.effect_prompts,
        seed=args.seed, layer=args.layer,
        top_k_choices=(args.top_k,) if args.top_k else None,
        scale_choices=(args.scale,) if args.scale else None,
    ))
    for relation in args.relation:
        extract_and_save(args.model, relation, args.out, args.data_dir, settings, args.force, placement=placement_of(args))


def _train(args) -> None:
    from ffv_eval.vectors.fine_tuning import TrainingSettings
    from ffv_eval.vectors.jobs import train_and_save

    settings = TrainingSettings(**_given(n_pairs=args.pairs_count, steps=args.steps, batch_size=args.batch_size,
                                         learning_rate=args.lr, l2=args.l2, init=args.init, seed=args.seed, loss=args.loss,
                                         scale=args.scale))
    for relation in args.relation:
        train_and_save(args.model, relation, args.out, args.start_from, args.data_dir, settings, args.pairs, args.force,
                       placement=placement_of(args))


def _decode(args) -> None:
    from ffv_eval.vectors.jobs import decode_and_print

    decode_and_print(args.vector, args.model, data_dir=args.data_dir, placement=placement_of(args), **_given(k=args.top))


def _build_library(args) -> None:
    from ffv_eval.vectors.fine_tuning import TrainingSettings
    from ffv_eval.vectors.jobs import build_library

    build_library(args.model, args.relations, args.force, training=TrainingSettings(**_given(init=args.init)),
                  placement=placement_of(args))


def _compare(args) -> None:
    from ffv_eval.evaluation.compare import compare_conditions, output_paths

    paths = output_paths(args.output, args.markdown, args.plot, args.log_file)
    compare_conditions(args.model, args.relations, limit=args.limit, placement=placement_of(args),
                       data_dir=args.data_dir, output=paths["output"], kinds=args.kinds,
                       markdown=paths["markdown"], plot=paths["plot"],
                       log_file=None if args.verbose else paths["log_file"],
                       command="ffv " + " ".join(sys.argv[1:]),
                       **_given(batch_size=args.batch_size, num_fewshot=args.num_fewshot))


def _check(args) -> int:
    from ffv_eval.evaluation.quality_gate import Tolerances, run_check

    tolerances = Tolerances(**_given(max_accuracy_drop=args.max_accuracy_drop, max_gain_drop=args.max_gain_drop,
                                     max_decoding_hit_drop=args.max_decoding_hit_drop,
                                     max_relative_movement=args.max_movement))
    return run_check(args.model, args.vectors, args.baseline, tolerances=tolerances, update=args.update_baseline,
                     placement=placement_of(args), **_given(kinds=args.kinds))


def _basis_build(args) -> None:
    from ffv_eval.vectors.basis import BasisSettings
    from ffv_eval.vectors.composite_fit import MapSettings
    from ffv_eval.vectors.composite_jobs import build_basis_and_map

    build_basis_and_map(args.model, args.data_dir, args.sources, args.out, args.force,
                        BasisSettings(**_given(steps=args.steps, relations_per_pass=args.relations_per_pass, layer=args.layer)),
                        MapSettings(**_given(steps=args.map_steps, stems_per_relation=args.stems_per_relation,
                                             targets_per_stem=args.targets_per_stem, posterior=args.posterior,
                                             map=args.map, top_k=args.top_k and tuple(args.top_k),
                                             scales=args.scales and tuple(args.scales),
                                             no_relation=args.no_relation and tuple(args.no_relation),
                                             question_sets=None if args.question_sets is None else tuple(args.question_sets),
                                             questions_per_set=args.questions_per_set)),
                        args.max_relations, placement=placement_of(args), screen=not args.no_screen)


def _compose(args) -> None:
    from ffv_eval.vectors.composite_jobs import explain_pairs

    explain_pairs(args.pair, args.model, args.basis, placement=placement_of(args), **_given(top=args.top))


def _leaderboard(args) -> None:
    from ffv_eval.evaluation.leaderboard import leaderboard_command

    prefix = args.out_prefix
    leaderboard_command(args.results_dirs, args.markdown or f"{prefix}.md", args.csv or f"{prefix}.csv",
                        args.html or f"{prefix}.html", allow_mixed_versions=args.allow_mixed_versions,
                        run_models=args.run_models, tasks=args.tasks, limit=args.limit, alignment_files=args.alignment,
                        quality_files=args.vector_quality, data_dir=args.data_dir,
                        **_given(conditions=args.conditions, batch_size=args.batch_size))


def _explain_cfv(args) -> None:
    from ffv_eval.evaluation.cfv_posteriors import explain_cfv_with_model as explain_cfv

    explain_cfv(args.results_dir, args.model, args.task, output=args.output, condition=args.condition, metric=args.metric,
                basis_dir=args.basis, placement=placement_of(args), **_given(limit=args.limit, only=args.only, top=args.top))


def _align(args) -> None:
    from ffv_eval.evaluation.alignment import align_shipped_vectors

    align_shipped_vectors(args.model, data_dir=args.data_dir, output=args.output, markdown=args.markdown,
                          max_comparisons=args.max_comparisons, max_subcategories=args.max_subcategories,
                          placement=placement_of(args), **_given(kinds=args.kinds, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract a function vector by causal mediation")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, Hugging Face id or local path")
    p.add_argument("--relation", required=True, nargs="+")
    p.add_argument("--out", help="output .safetensors (default: ./vectors/<model>/fv/<relation>.safetensors in the working directory)")
    p.add_argument("--data-dir", help="read Todd et al.'s files from this directory (default: $FFV_DATA_DIR, else the project's pairs)")
    p.add_argument("--layer", type=int, help="add the vector after this block (default: chosen by validation accuracy)")
    p.add_argument("--top-k", type=int, help="number of heads (default: chosen from 1, 3, 10)")
    p.add_argument("--scale", type=float, help="scale of the summed heads (default: chosen from 1, 2, 4)")
    p.add_argument("--shots", type=int, help="demonstrations per in-context prompt")
    p.add_argument("--mean-prompts", type=int, help="clean prompts the mean head outputs are taken over")
    p.add_argument("--effect-prompts", type=int, help="shuffled-label prompts each head's indirect effect is measured on")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true", help="overwrite an existing vector")
    add_placement_arguments(p)
    p.set_defaults(run=_extract)

    p = sub.add_parser("train", help="fine-tune a function vector (FFV) with the model frozen")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--relation", required=True, nargs="+")
    p.add_argument("--init", choices=["fv", "random", "icl-diff"],  # vectors.fine_tuning.INITS
                   help="start from the relation's FV (default), random (the ablation), or the "
                        "in-context difference of the training pairs (icl-diff)")
    p.add_argument("--loss", choices=["answer", "answer-newline", "first-token"],  # vectors.fine_tuning.LOSSES
                   help="cross-entropy over the answer's tokens and the newline that ends it, teacher-forced (default), "
                        "over the answer's tokens only, or over its first token only")
    p.add_argument("--start-from", help="FV file to start from (default: the relation's FV in ./vectors/<model>/fv/, else the shipped one)")
    p.add_argument("--out", help="output .safetensors (default: ./vectors/<model>/ffv[-random]/<relation>.safetensors in the working directory)")
    p.add_argument("--pairs", help="training pairs (.jsonl of {input, output}; default: the relation's train split)")
    p.add_argument("--pairs-count", type=int, help="number of training pairs used")
    p.add_argument("--data-dir", help="read Todd et al.'s files from this directory")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate, relative to the vector's RMS")
    p.add_argument("--l2", type=float, help="weight of the L2 term (|v|/|v0|)^2")
    p.add_argument("--scale", type=float, help="the trained vector is saved multiplied by this")
    p.add_argument("--seed", type=int)
    p.add_argument("--force", action="store_true")
    add_placement_arguments(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("decode", help="tokens a vector promotes through the final norm and unembedding")
    p.add_argument("vector", nargs="+", help="a .safetensors file, kind:relation, or a relation name (FV and FFV side by side)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--top", type=int, help="tokens shown per vector")
    p.add_argument("--data-dir")
    add_placement_arguments(p)
    p.set_defaults(run=_decode)

    p = sub.add_parser("build-library", help="build the FV, FFV and random-init FFV of every relation for a model under ./vectors "
                                            "(run in the checkout: the shipped library)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--relations", nargs="+", help="default: every relation with project word pairs")
    p.add_argument("--force", action="store_true", help="rebuild everything from scratch")
    p.add_argument("--init", choices=["fv", "icl-diff"],  # vectors.fine_tuning.INITS but the random one
                   help="the start of each relation's FFV: its FV (default) or the in-context difference (icl-diff); "
                        "the random-init FFV is built either way")
    add_placement_arguments(p)
    p.set_defaults(run=_build_library)

    p = sub.add_parser("compare", help="score a model zero-shot, with its vectors, and k-shot with lm-eval")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--relations", nargs="+", default=None, help="default: the six headline relations; 'all': every project relation")
    p.add_argument("--limit", type=int, default=None, help="test examples per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-fewshot", type=int, help="shots of the k-shot condition")
    p.add_argument("--data-dir", help="score on Todd et al.'s files from this directory")
    p.add_argument("--output", help="write the comparison as JSON here (default: ./ffv-compare/compare.json; the other "
                                    "files default to this path's stem with .md, .png, .log)")
    p.add_argument("--kinds", nargs="+", default=None, choices=KINDS,
                   help="shipped vectors to patch in, one condition each (default: every kind shipped for all the relations)")
    p.add_argument("--markdown", help="write the table, with the command that regenerates it, as Markdown here "
                                      "(default: beside --output, else ./ffv-compare/compare.md)")
    p.add_argument("--plot", help="write a bar chart (exact match, ±1.96 stderr error bars) as PNG here "
                                  "(default: beside --output or --markdown, else ./ffv-compare/compare.png)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--log-file", help="lm-eval's and the model libraries' output goes here instead of the terminal "
                                          "(default: beside --output or --markdown, else ./ffv-compare/compare.log)")
    shown.add_argument("--verbose", action="store_true",
                       help="show lm-eval's output on the terminal (no log file, no progress bar)")
    add_placement_arguments(p)
    p.set_defaults(run=_compare)

    p = sub.add_parser("leaderboard", help="one table (model x condition x task) of lm-eval results files, as Markdown, CSV and HTML")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                   help="directories searched for lm-eval results_*.json (or such files); with --run, new runs go to the first")
    p.add_argument("--out-prefix", default="leaderboard", help="default for the three outputs: PREFIX.md, PREFIX.csv, PREFIX.html")
    p.add_argument("--markdown", help="Markdown output (default: PREFIX.md)")
    p.add_argument("--csv", help="CSV output, one row per model, condition and task (default: PREFIX.csv)")
    p.add_argument("--html", help="self-contained HTML page with plots (default: PREFIX.html)")
    p.add_argument("--allow-mixed-versions", action="store_true", help="show runs of different task versions side by side")
    p.add_argument("--run", nargs="+", metavar="MODEL", dest="run_models", help="first run the missing lm-eval evaluations of these models")
    p.add_argument("--tasks", nargs="+", help="tasks for --run (groups of ffv-eval's tasks, e.g. relations, todd, expand to their tasks)")
    p.add_argument("--conditions", nargs="+",
                   help="for --run: unpatched, <k>-shot, a vector kind (" + ", ".join(KINDS) + ": each relation's own), "
                        "cfv (a composite vector per question), auto (ffv-patched's vector=auto: relation tasks their FFV, "
                        "analogy questions their CFV), or <kind>:<relation> (one vector for all tasks)")
    p.add_argument("--limit", type=int, default=None,
                   help="for --run: test examples per task (default: the full test sets; paired gains need equal limits)")
    p.add_argument("--batch-size", type=int, help="for --run")
    p.add_argument("--data-dir", help="for --run: data directory of the todd_<relation> and analogy tasks, recorded in "
                                      "the results (default: $FFV_DATA_DIR)")
    p.add_argument("--alignment", nargs="+", default=[], help="`ffv align --output` files to show as a table")
    p.add_argument("--vector-quality", nargs="+", default=[],
                   help="`ffv check` baseline files (vectors/<model>/quality-baseline.json) to show: test accuracy, gain, decoding hits")
    p.set_defaults(run=_leaderboard)

    p = sub.add_parser("check", help="CI gate: compare vector quality with a baseline file (exit 1 on a regression)")
    p.add_argument("vectors", nargs="*", help=".safetensors files (default: the model's shipped vectors of --kinds)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--baseline", help="baseline file (default: ./vectors/<model>/quality-baseline.json if it exists, else the shipped "
                                          "one; --update-baseline writes only the file given or that ./vectors one)")
    p.add_argument("--kinds", nargs="+", choices=KINDS,
                   help="shipped vector kinds checked when no files are given")
    p.add_argument("--update-baseline", action="store_true", help="measure and write the baseline instead of checking")
    p.add_argument("--max-accuracy-drop", type=float, help="absolute drop in test accuracy allowed")
    p.add_argument("--max-gain-drop", type=float, help="absolute drop in gain over zero-shot allowed")
    p.add_argument("--max-decoding-hit-drop", type=int, help="drop in answer tokens among the top 20 allowed")
    p.add_argument("--max-movement", type=float, help="relative L2 distance from the baseline vector allowed")
    add_placement_arguments(p)
    p.set_defaults(run=_check)

    p = sub.add_parser("basis", help="the basis of composite function vectors")
    basis_sub = p.add_subparsers(dest="basis_command", required=True)
    p = basis_sub.add_parser("build", help="train the missing basis FFVs and fit the composite map")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data-dir", help="add every relation found here (default: $FFV_DATA_DIR; without one, the project's relations only)")
    p.add_argument("--sources", nargs="+", choices=["project", "todd", "bats", "google", "semeval"],
                   help="relation sources (default: all found)")
    p.add_argument("--out", help="basis directory (default: ./vectors/<model>/basis in the working directory)")
    p.add_argument("--steps", type=int, help="training steps per basis FFV")
    p.add_argument("--relations-per-pass", type=int, help="relations trained together in one forward pass")
    p.add_argument("--layer", type=int, help="the block the basis FFVs are added after (default: the most common layer of the "
                                             "model's shipped FFVs); build each layer into its own --out")
    p.add_argument("--map-steps", type=int, help="steps fitting the affine map")
    p.add_argument("--stems-per-relation", type=int, help="source pairs A:B per basis relation in the map's training analogies")
    p.add_argument("--targets-per-stem", type=int, help="C:D pairs per source pair in the map's training analogies")
    p.add_argument("--posterior", choices=["auto", "softmax", "calibrated"],
                   help="posterior over basis relations: the paper's softmax, calibrated (each relation against its own "
                        "baseline, fitted temperature), or auto (default: the one validation on held-out relations supports)")
    p.add_argument("--map", choices=["auto", "fitted", "identity"],
                   help="weights from the posterior: the fitted affine map (the paper's), the posterior itself (identity), "
                        "or auto (default: the one validation on held-out relations supports)")
    p.add_argument("--top-k", type=int, nargs="+", metavar="K",
                   help="posterior sharpness tried with W = s I: keep each posterior's K most likely relations (0: all; default 0 1 3)")
    p.add_argument("--scales", type=float, nargs="+", metavar="S", help="CFV scales s tried with W = s I (default 0.25 0.5 1)")
    p.add_argument("--no-relation", type=_margin, nargs="+", metavar="M",
                   help="margins (nats) of a 'no relation' option tried with W = s I: it scores the prompt without a vector "
                        "plus M and its mass adds no vector ('none': no such option; default none)")
    p.add_argument("--question-sets", nargs="*", choices=["u2", "u4", "bats", "google"], metavar="SET",
                   help="multiple-choice sets whose valid.jsonl questions choose the CFV settings by acc_d, where the data "
                        "directory has them (default: u2 u4 bats google; none: held-out relations choose)")
    p.add_argument("--questions-per-set", type=int, help="validation questions of each set (its first N; 0: all; default 100)")
    p.add_argument("--max-relations", type=int, help="use only the first N relations (for quick trials)")
    p.add_argument("--force", action="store_true", help="retrain every basis FFV")
    p.add_argument("--no-screen", action="store_true",
                   help="build without screening out the pairs of the analogy and relation test sets found (refused otherwise "
                        "when no analogy test set is found)")
    add_placement_arguments(p)
    p.set_defaults(run=_basis_build)

    p = sub.add_parser("compose", help="show the top basis relations and weights of the CFV for a pair")
    p.add_argument("--pair", nargs="+", required=True, help="source pairs a:b")
    p.add_argument("--basis", help="basis directory (default: the model's own, in ./vectors or the shipped vectors)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--top", type=int, help="basis relations shown per pair")
    add_placement_arguments(p)
    p.set_defaults(run=_compose)

    p = sub.add_parser("explain-cfv", help="evidence of what a CFV did to one task's questions, side by side with unpatched "
                                          "(answers, posteriors, where the vector was added), from `ffv leaderboard --run` results")
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="results directory of `ffv leaderboard --run` (with samples files)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias, as the results record it")
    p.add_argument("--task", required=True, help="an analogy task of the results, e.g. u2_analogy or analogy_completion_kmiecik")
    p.add_argument("--limit", type=int, help="documents shown (default: 20)")
    p.add_argument("--only", choices=["all", "lost", "won", "changed"],
                   help="questions shown: all, lost (right unpatched, wrong with the CFV), won (the reverse), or changed "
                        "(another answer); default: all")
    p.add_argument("--metric", help="metric that decides won and lost (default: the task's primary: acc, top_answer); acc_d")
    p.add_argument("--condition", choices=["cfv", "auto"], help="the patched run (default: cfv if the results have it, else auto)")
    p.add_argument("--top", type=int, help="basis relations of each CFV's posterior shown (default: 5; 0: none, no model loaded)")
    p.add_argument("--basis", help="basis directory (default: the one the run recorded, else the model's own)")
    p.add_argument("--output", help="write the Markdown report here (default: standard output)")
    add_placement_arguments(p)
    p.set_defaults(run=_explain_cfv)

    p = sub.add_parser("align", help="agreement of FV / FFV relation representations with human similarity judgments")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--kinds", nargs="+", choices=KINDS, help="shipped vector kinds")
    p.add_argument("--data-dir", help="directory with relsim/ and semeval2012/ (default: $FFV_DATA_DIR)")
    p.add_argument("--max-comparisons", type=int, help="seeded subset of the relsim comparisons (default: all)")
    p.add_argument("--max-subcategories", type=int, help="seeded subset of SemEval-2012 subcategories (default: all 79)")
    p.add_argument("--seed", type=int, help="seed of the subsets and the bootstrap resamples")
    p.add_argument("--output", help="write the figures, and the paired differences between the kinds, as JSON here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    add_placement_arguments(p)
    p.set_defaults(run=_align)
    return parser


def main(argv=None) -> int:
    """Run one subcommand; its exit status. Bad input (an FFVError, whose message names the file,
    field or line and the fix) is one line `ffv: error: ...` on stderr and exit status 2, as
    argparse does for bad arguments; any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except FFVError as err:
        print(f"ffv: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
