"""The `ffv` command line: a thin layer over the library modules."""

from __future__ import annotations

import argparse
import sys


def _extract(args) -> None:
    from ffv_eval.vector_jobs import extract_and_save
    from ffv_eval.function_vectors import ExtractionSettings

    settings = ExtractionSettings(
        n_shots=args.shots, n_mean_prompts=args.mean_prompts, n_effect_prompts=args.effect_prompts,
        seed=args.seed, layer=args.layer,
        **({"top_k_choices": (args.top_k,)} if args.top_k else {}),
        **({"scale_choices": (args.scale,)} if args.scale else {}),
    )
    for relation in args.relation:
        extract_and_save(args.model, relation, args.out, args.data_dir, settings, args.force)


def _train(args) -> None:
    from ffv_eval.fine_tuning import TrainingSettings
    from ffv_eval.vector_jobs import train_and_save

    settings = TrainingSettings(n_pairs=args.pairs_count, steps=args.steps, batch_size=args.batch_size,
                                learning_rate=args.lr, l2=args.l2, init=args.init, seed=args.seed)
    for relation in args.relation:
        train_and_save(args.model, relation, args.out, args.start_from, args.data_dir, settings, args.pairs, args.force)


def _decode(args) -> None:
    from ffv_eval.vector_jobs import decode_and_print

    decode_and_print(args.vector, args.model, args.top, args.data_dir)


def _build_library(args) -> None:
    from ffv_eval.vector_jobs import build_library

    build_library(args.model, args.relations, args.force)


def _compare(args) -> None:
    from ffv_eval.comparison import compare_conditions

    compare_conditions(args.model, args.relations, limit=args.limit, batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot, data_dir=args.data_dir, output=args.output, kinds=args.kinds,
                       markdown=args.markdown, command="ffv " + " ".join(sys.argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract a function vector by causal mediation")
    p.add_argument("--model", default="gemma-3-270m", help="embedded alias, Hugging Face id or local path")
    p.add_argument("--relation", required=True, nargs="+")
    p.add_argument("--out", help="output .safetensors (default: vectors/<model>/fv/<relation>.safetensors)")
    p.add_argument("--data-dir", help="read Todd et al.'s files from this directory (default: $FFV_DATA_DIR, else the project's pairs)")
    p.add_argument("--layer", type=int, help="add the vector after this block (default: chosen by validation accuracy)")
    p.add_argument("--top-k", type=int, help="number of heads (default: chosen from 1, 3, 10)")
    p.add_argument("--scale", type=float, help="scale of the summed heads (default: chosen from 1, 2, 4)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--mean-prompts", type=int, default=32)
    p.add_argument("--effect-prompts", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing vector")
    p.set_defaults(run=_extract)

    p = sub.add_parser("train", help="fine-tune a function vector (FFV) with the model frozen")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--relation", required=True, nargs="+")
    p.add_argument("--init", choices=["fv", "random"], default="fv", help="start from the relation's FV, or random (the ablation)")
    p.add_argument("--start-from", help="FV file to start from (default: vectors/<model>/fv/<relation>.safetensors)")
    p.add_argument("--out", help="output .safetensors (default: vectors/<model>/ffv[-random]/<relation>.safetensors)")
    p.add_argument("--pairs", help="training pairs (.jsonl of {input, output}; default: the relation's train split)")
    p.add_argument("--pairs-count", type=int, default=20, help="number of training pairs used")
    p.add_argument("--data-dir", help="read Todd et al.'s files from this directory")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate, relative to the vector's RMS")
    p.add_argument("--l2", type=float, default=0.01, help="weight of the L2 term (|v|/|v0|)^2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=_train)

    p = sub.add_parser("decode", help="tokens a vector promotes through the final norm and unembedding")
    p.add_argument("vector", nargs="+", help="a .safetensors file, kind:relation, or a relation name (FV and FFV side by side)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--data-dir")
    p.set_defaults(run=_decode)

    p = sub.add_parser("build-library", help="build the shipped FV, FFV and random-init FFV of every relation for a model")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--relations", nargs="+", help="default: every relation with project word pairs")
    p.add_argument("--force", action="store_true", help="rebuild everything from scratch")
    p.set_defaults(run=_build_library)

    p = sub.add_parser("compare", help="score a model zero-shot, with its vectors, and k-shot with lm-eval")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--relations", nargs="+", default=None, help="default: the six headline relations; 'all': every project relation")
    p.add_argument("--limit", type=int, default=None, help="test examples per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-fewshot", type=int, default=10)
    p.add_argument("--data-dir", help="score on Todd et al.'s files from this directory")
    p.add_argument("--output", help="write the comparison as JSON here")
    p.add_argument("--kinds", nargs="+", default=None, choices=["fv", "ffv", "ffv-random"],
                   help="shipped vectors to patch in, one condition each (default: every kind shipped for all the relations)")
    p.add_argument("--markdown", help="also write the table, with the command that regenerates it, as Markdown here")
    p.set_defaults(run=_compare)
    return parser


def main(argv=None) -> int:
    from ffv_eval.fine_tuning import DivergedTraining

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, DivergedTraining) as err:  # our errors name the file, field or line
        print(f"ffv: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
