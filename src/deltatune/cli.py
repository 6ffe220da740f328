"""The command line: parse arguments, call the Python API, print what happened.

Each command imports what it needs when it runs, so ``--help`` and a mistyped argument answer at
once: torch and transformers are loaded only by the commands that use them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import AdapterFileError, ConfigError, DeltatuneError
from .env import offline_and_quiet

#: the ways `deltatune combine` takes (core/combine.py's COMBINATIONS; listed here so that --help imports no torch)
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")

if TYPE_CHECKING:
    from .io.run_folder import Located

ADAPTER_HELP = ("a run folder (its best adapter, RUN/adapter), an adapter folder, or a peft adapter folder "
                "(adapter_config.json + adapter_model.safetensors)")
PRECISION_HELP = "auto, fp32, bf16 or fp16 (default: what the run trained in)"
RUN_HELP = "a run folder (its best adapter, RUN/adapter) or that adapter folder: the run gives the task and labels"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    offline_and_quiet()
    from . import methods  # noqa: F401  (registers every method: run configs and adapter files name theirs)

    try:
        return args.run(args) or 0
    except DeltatuneError as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    # --debug before or after the command; SUPPRESS keeps a command's parser from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    parser = argparse.ArgumentParser(prog="deltatune", description="Fine-tune transformers fully or with PEFT.",
                                     parents=[common])
    sub = parser.add_subparsers(metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])
    _run_commands(sub)
    _adapter_commands(sub)
    return parser


def _run_commands(sub: Any) -> None:
    """Commands that train or use a run: train, eval, predict, compare, tune, serve."""
    train = sub.add_parser("train", help="train one run from a YAML config (default: the bundled example)")
    train.add_argument("config", nargs="?", help="run config YAML")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set training.epochs=2; --set method=ia3 takes "
                            "that method's defaults (keeping modules_to_save)")
    train.add_argument("--output-dir", help="run folder (training.output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.set_defaults(run=_train)

    evaluate = sub.add_parser("eval", help="evaluate a run's adapter")
    evaluate.add_argument("adapter", metavar="ADAPTER", help=RUN_HELP)
    evaluate.add_argument("--data", help="a data file with the run's columns (default: the run's test split)")
    evaluate.add_argument("--precision", metavar="P", help=PRECISION_HELP)
    evaluate.set_defaults(run=_eval)

    predict = sub.add_parser("predict", help="predict with a run's adapter (labels, tags, answers, completions)")
    predict.add_argument("adapter", metavar="ADAPTER", help=RUN_HELP)
    predict.add_argument("text", nargs="*", help="texts (sentences to classify or tag, prompts to complete)")
    predict.add_argument("--input", help="a .txt file (one text per line) or a data file (rows with the "
                                         "task's columns; qa needs question and context)")
    predict.add_argument("--column", help="take only this column of --input (default: whole rows)")
    predict.add_argument("--output", help="write predictions as JSONL here instead of printing")
    predict.add_argument("--precision", metavar="P", help=PRECISION_HELP)
    predict.set_defaults(run=_predict)

    compare = sub.add_parser("compare", help="train every method on identical work and compare them")
    compare.add_argument("config", nargs="?", help="comparison YAML (default: all methods, bundled task)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    compare.add_argument("--output-dir", help="report folder (output_dir)")
    compare.set_defaults(run=_compare)

    tune = sub.add_parser("tune", help="search hyperparameters (the config's search: section) with Optuna")
    tune.add_argument("config", help="run config YAML with a search: section")
    tune.add_argument("--trials", type=int, required=True,
                      help="trials to finish, counting those already finished in the output folder")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value")
    tune.add_argument("--output-dir", help="search folder (training.output_dir); run again to resume")
    tune.set_defaults(run=_tune)

    serve = sub.add_parser("serve", help="serve many runs' adapters over one base model (HTTP, batched)")
    serve.add_argument("base", nargs="?", metavar="BASE",
                       help="the base model: a model folder, a bundled model's name, or a run folder (its "
                            "base); default: the first adapter's run's base")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                       help="serve the run folder RUN (its best adapter) as NAME; repeat for more")
    serve.add_argument("--precision", metavar="P", help=PRECISION_HELP.replace("the run", "each run"))
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=32, metavar="N", help="rows per batch (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                       help="how long a request waits for others to join its batch (default: %(default)s)")
    serve.add_argument("--max-inputs", type=int, default=64, metavar="N",
                       help="inputs per request (default: %(default)s)")
    serve.add_argument("--max-input-chars", type=int, default=10_000, metavar="N",
                       help="characters per input (default: %(default)s)")
    serve.set_defaults(run=_serve)


def _adapter_commands(sub: Any) -> None:
    """Commands on adapter files and the registry: convert, inspect, combine, export, methods, demo."""
    convert = sub.add_parser("convert", help="convert an adapter between deltatune and peft formats")
    convert.add_argument("adapter", metavar="ADAPTER", help=ADAPTER_HELP)
    convert.add_argument("output", metavar="OUTPUT", help="the folder to write the converted adapter to")
    convert.add_argument("--to", choices=["peft", "deltatune"], required=True)
    convert.set_defaults(run=_convert)

    inspect = sub.add_parser("inspect", help="print an adapter's method, config, base and tensors")
    inspect.add_argument("adapter", metavar="ADAPTER", help=ADAPTER_HELP)
    inspect.set_defaults(run=_inspect)

    export = sub.add_parser("export", help="merge an adapter into its base and save a plain model")
    export.add_argument("adapter", metavar="ADAPTER", help=ADAPTER_HELP)
    export.add_argument("output", metavar="OUTPUT", help="the folder to write the merged model to")
    export.add_argument("--base", help="the base model folder (default: the one recorded in the adapter)")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), help="the dtype of the written weights (default: the "
                        "base checkpoint's); the merge computes in float32 and rounds once. A base the adapter "
                        "trained on quantised is loaded unquantised for the merge.")
    export.set_defaults(run=_export)

    combine = sub.add_parser("combine", help="combine several adapters into one (peft's add_weighted_adapter)")
    combine.add_argument("adapters", metavar="ADAPTER", nargs="+", help=ADAPTER_HELP)
    combine.add_argument("--weights", type=float, nargs="+", required=True,
                         help="one weight per adapter, in order; a negative weight subtracts")
    combine.add_argument("--how", default="svd", choices=COMBINATIONS, help="the way to combine (default: %(default)s)")
    combine.add_argument("--output", required=True, help="the folder to write (a run folder where the adapters are runs)")
    combine.add_argument("--density", type=float, help="ties, dare_*, magnitude_prune: the fraction of values kept")
    combine.add_argument("--svd-rank", type=int, help="*svd: the result's rank (default: the largest combined)")
    combine.add_argument("--svd-clamp", type=float, help="*svd: clamp the factors to this quantile of their values")
    combine.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                         help="ties: how each value's sign is elected (default: %(default)s)")
    combine.add_argument("--seed", type=int, default=0, help="dare_*: the seed of the random masks (default: %(default)s)")
    combine.add_argument("--head", type=int, help="where the adapters train different task heads: the position "
                         "(0, 1, ...) of the adapter whose head the result keeps")
    combine.set_defaults(run=_combine)

    methods = sub.add_parser("methods", help="list the registered methods by PEFT family")
    methods.set_defaults(run=_methods)

    demo = sub.add_parser("demo", help="LoRA on the bundled model: report, merge, save, reload")
    demo.set_defaults(run=_demo)


def locate_adapter(path: str | Path, need_run: bool = False) -> Located:
    """The adapter an ADAPTER argument names, said on stderr: a run folder gives its best
    adapter (RUN/adapter); an adapter folder (deltatune or peft format) is taken as it is.

    Raises:
        ConfigError: ``need_run`` (eval, predict) and the path is no run folder nor a run's adapter.
        AdapterFileError: a run without an adapter yet; a path with neither a run nor adapter files.
    """
    from .io.adapter_files import CONFIG_NAME, WEIGHTS_NAME
    from .io.run_folder import RUN_CONFIG, Located, find_run, locate

    located = locate(path)
    path, run = located.adapter, located.run
    if run is not None:
        if not (path / WEIGHTS_NAME).is_file():
            raise AdapterFileError(f"run '{run}' has no adapter yet (it is saved at the first evaluation).",
                                   f"resume it: deltatune train {run / RUN_CONFIG} --output-dir {run} --resume")
        print(f"using adapter {path} (best checkpoint of run {run})", file=sys.stderr)
        return Located(path, run)
    has_files = any((path / name).is_file() for name in (CONFIG_NAME, WEIGHTS_NAME))
    if need_run:
        find_run(path)  # says why there is none
    if not has_files:
        raise AdapterFileError(f"'{path}' is neither a run folder nor an adapter folder"
                               f"{'' if path.is_dir() else ' (it does not exist)'}.", f"pass {ADAPTER_HELP}.")
    print(f"using adapter {path} ({_adapter_format(path / CONFIG_NAME)} format)", file=sys.stderr)
    return Located(path, None)


def _adapter_format(config: Path) -> str:
    try:
        return "peft" if "peft_type" in json.loads(config.read_text(encoding="utf-8")) else "deltatune"
    except (OSError, ValueError):
        return "deltatune"  # no or broken adapter_config.json: the weights file carries the config


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.loop import train
    from .train.precision import describe

    # under torchrun every process runs this; one of them speaks
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *_, **__: None)

    overrides = list(args.set) + ([f"training.output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_config(args.config, overrides)
    if args.config is None:
        say(f"No config given: training the bundled default ({config.method.method} on "
              f"{config.model.name_or_path}, {config.data.source}).")
    say(describe(config.training.precision))
    if config.model.quantization:
        say(f"base: quantised by bitsandbytes, {config.model.quantization.describe()} (the task head unquantised)")
    result = train(config, resume=args.resume)
    report = result.parameters
    say(f"\n{'interrupted; resume with --resume' if result.interrupted else 'done'}: {result.steps} steps "
          f"in {result.train_seconds:.1f} s ({result.step_seconds:.3f} s/step), peak memory "
          f"{result.peak_memory_mb:.0f} MB")
    say(f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
          f"stored params: {report.stored:,} ({result.adapter_bytes:,} bytes on disk)"
          + f" || frozen weights: {report.frozen_bytes / 2**20:,.1f} MiB in memory"
          + (f", {report.quantized:,} values quantised" if report.quantized else ""))
    for key, value in result.metrics.items():
        say(f"  {key:<16} {value:.4f}")
    say(f"results: {Path(result.output_dir).resolve()} (report.json, metrics.jsonl, curves.png, adapter/)")
    return 130 if result.interrupted else 0


def _compare(args: argparse.Namespace) -> int:
    from .compare.config import load_compare_config
    from .compare.report import markdown
    from .compare.runner import compare

    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_compare_config(args.config, overrides)
    report = compare(config)
    print("\n" + markdown(report))
    seconds = report["seconds"]
    if seconds["training_share"] is not None:
        print(f"\n{seconds['wall']:.0f} s, {100 * seconds['training_share']:.0f}% of it training")
    print(f"open {(Path(config.output_dir) / 'report.html').resolve().as_uri()}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .search import load_tune_config, tune
    from .search.report import markdown
    from .train.precision import describe

    overrides = list(args.set) + ([f"training.output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_tune_config(args.config, overrides)
    print(describe(config.run_config({}).training.precision))
    try:
        result = tune(config, args.trials)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue the search in {config.output_dir}",
              file=sys.stderr)
        return 130
    print("\n" + markdown(result, [p.key for p in config.space]))
    if result.best is None:
        raise DeltatuneError(f"no trial completed; see {config.output_dir / 'tune.md'} for why.",
                             "fix or narrow the search space, or raise --trials to go on.")
    print(f"\nresults: {config.output_dir} (tune.json, tune.md, best.yaml, trial-NNN/)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve.app import serve
    from .serve.requests import Settings

    adapters = [_named_run(value) for value in args.adapter]
    settings = Settings(max_inputs=args.max_inputs, max_input_chars=args.max_input_chars,
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    serve(args.base, adapters, args.host, args.port, settings, args.precision)
    return 0


def _named_run(value: str) -> tuple[str, str]:
    name, equals, path = value.partition("=")
    if not (name and equals and path):
        raise ConfigError(f"--adapter {value}: expected NAME=RUN.", "e.g. --adapter sentiment=runs/default")
    return name, path


def _convert(args: argparse.Namespace) -> int:
    from .io.convert import convert

    print(f"wrote {convert(locate_adapter(args.adapter).adapter, args.output, args.to)} ({args.to} format)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .io.convert import inspect_adapter

    print(inspect_adapter(locate_adapter(args.adapter).adapter))
    return 0


def _combine(args: argparse.Namespace) -> int:
    from .io.combine import combine_folders

    folders = [locate_adapter(path) for path in args.adapters]  # says which adapter each path gives
    written = combine_folders([f.run or f.adapter for f in folders], args.weights, args.output, how=args.how,
                              head=args.head, density=args.density, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
                              majority_sign_method=args.majority_sign_method, seed=args.seed)
    print(f"wrote the combined adapter ({args.how}) to {written}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .io.export import export_merged

    adapter = locate_adapter(args.adapter).adapter
    print(f"wrote a plain transformers model to {export_merged(adapter, args.output, args.base, args.dtype)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train.inference import evaluate_run

    metrics = evaluate_run(locate_adapter(args.adapter, need_run=True).run, args.data, args.precision)
    print(json.dumps(metrics, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .train.inference import predict_texts, read_texts

    texts = list(args.text) + (read_texts(args.input, args.column) if args.input else [])
    if not texts:
        raise DeltatuneError("predict needs texts.", "pass them as arguments or with --input FILE.")
    rows = predict_texts(locate_adapter(args.adapter, need_run=True).run, texts, args.precision)
    lines = "\n".join(json.dumps(row) for row in rows)
    if args.output:
        Path(args.output).write_text(lines + "\n", encoding="utf-8")
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        print(lines)
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .core.method import FAMILIES, registered

    for family in FAMILIES:
        rows = [m for m in registered().values() if m.family == family]
        if rows:
            print(f"{family}:")
        for method in sorted(rows, key=lambda m: m.name):
            merges = "merges" if method.mergeable else "does not merge"
            print(f"  {method.name:<9} {method.config_class.__name__:<22} {merges:<15} params: {method.count_formula}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
