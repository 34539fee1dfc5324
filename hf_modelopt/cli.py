"""`hf-modelopt`: a thin command line over the Python API (run, eval, inspect)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import sys
from urllib.parse import urlparse

logger = logging.getLogger("hf_modelopt")


def use_offline_mode_if_hub_unreachable(timeout: float = 3.0) -> None:
    """Set HF_HUB_OFFLINE=1 when the Hub cannot be reached, so cached models load at once.

    Without it every `from_pretrained` retries each file for minutes before falling back to the cache.
    An explicit HF_HUB_OFFLINE (0 or 1) is always respected. Must run before huggingface_hub is imported,
    which reads the variable once.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub" in sys.modules:
            import huggingface_hub.constants

            huggingface_hub.constants.HF_HUB_OFFLINE = True
        logger.info("%s is unreachable: using the local Hugging Face cache (HF_HUB_OFFLINE=1)", host)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-modelopt", description="Distill, prune and quantize 🤗 models.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--output-dir", required=True, help="where stages, the final model and its card go")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set training.learning_rate=3e-5 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="continue the stage an interrupted run in --output-dir left unfinished, from its last "
                     "checkpoint (finished stages are reused either way)")
    run.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty --output-dir that holds no earlier run (same-name files replaced)")

    evaluate = commands.add_parser("eval", help="metrics of a saved model on a recipe's evaluation data")
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument("--recipe", required=True, help="recipe whose task and evaluation data to use")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--json", action="store_true", help="print JSON only")

    inspect = commands.add_parser("inspect", help="parameters, sizes, dtypes and per-tensor statistics")
    inspect.add_argument("model", help="model folder or Hub id")
    inspect.add_argument("--gguf-file", help="GGUF file inside the folder or repository")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench = commands.add_parser("bench", help="latency of models side by side (speed-up vs the first)")
    bench.add_argument("models", nargs="+", help="model folders or Hub ids; the first is the reference")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--seq-len", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=20, help="timed runs per model (median reported)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _load_any(path: str, **kwargs):
    """A saved model with its head, whatever the task (the class named in its config)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    architecture = (config.architectures or ["AutoModel"])[0]
    return getattr(transformers, architecture, transformers.AutoModel).from_pretrained(path, **kwargs)


def _bench(args) -> int:
    from .benchmark import compare_latency, format_latency_table

    models = {path: _load_any(path) for path in args.models}
    results = compare_latency(models, args.batch_size, args.seq_len, args.repeats)
    print(json.dumps(results, indent=2) if args.json else format_latency_table(results))
    return 0


def _run(args) -> int:
    from .interrupt import RunInterrupted
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .distributed import is_main_process

    try:
        result = run_recipe(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    except RunInterrupted as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}{_where(stop)}; resume with: "
              f"{resume_command(args)}", file=sys.stderr)
        return stop.exit_code
    if not is_main_process():
        return 0  # the main process prints the summary
    print(f"\nDone. Final model, card and metrics in {result['output_dir']}")
    for record in result["metrics"]:
        values = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record["metrics"].items())
        print(f"  {record['name']:<16} {record['model']}: {values}")
    return 0


def resume_command(args) -> str:
    """The command line that continues this `run` (the same recipe, output folder and overrides)."""
    words = ["hf-modelopt", "run", args.recipe, "--output-dir", args.output_dir]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words + ["--resume"])


def _where(stop) -> str:
    if stop.checkpoint:
        return f" in stage '{stop.stage}': checkpoint of step {stop.step} saved in {stop.checkpoint}"
    return " (no training step in progress, nothing to save)"


def _eval(args) -> int:
    from .metrics import evaluate_model
    from .modeling import load_model, load_tokenizer
    from .pipeline import preflight
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe)
    model = load_model(recipe.model, recipe.task, path=args.model)
    tokenizer = load_tokenizer(recipe.model, path=args.model)
    metrics = evaluate_model(model, tokenizer, recipe)
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


def _inspect(args) -> int:
    from .inspection import format_report, inspect_model

    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = _load_any(args.model, **kwargs)
    report = inspect_model(model, args.model if os.path.isdir(args.model) else None)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    args = make_parser().parse_args(argv)
    # Our own progress lines only; libraries keep their default (warnings and above).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[hf-modelopt] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    use_offline_mode_if_hub_unreachable()
    try:
        return {"run": _run, "eval": _eval, "inspect": _inspect, "bench": _bench}[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
