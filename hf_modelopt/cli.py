"""`hf-modelopt`: a thin command line over the Python API (run, eval, inspect, bench, stages, push)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
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


TRUST_REMOTE_CODE_HELP = ("run Python code shipped with the model (`auto_map` in its config); off by default: "
                          "without it such a model is refused, never prompted for")


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
    run.add_argument("--rerun-from", metavar="STAGE", help="run this stage and the later ones even if the stage "
                     "cache holds them (earlier stages are still reused)")

    evaluate = commands.add_parser("eval", help="metrics of a saved model on a recipe's evaluation data")
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument("--recipe", required=True, help="recipe whose task and evaluation data to use")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--json", action="store_true", help="print JSON only")
    evaluate.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP + " (MODEL's; the "
                          "recipe's own model follows its model.trust_remote_code)")

    inspect = commands.add_parser("inspect", help="parameters, sizes, dtypes and per-tensor statistics")
    inspect.add_argument("model", help="model folder or Hub id")
    inspect.add_argument("--gguf-file", help="GGUF file inside the folder or repository")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    bench = commands.add_parser(
        "bench", help="models side by side: metric, parameters, size on disk, peak memory, latency, throughput")
    bench.add_argument("models", nargs="+", help="model folders (exports, stage outputs) or Hub ids; the first is "
                       "the reference of every ratio")
    bench.add_argument("--recipe", help="measure the metric of this recipe's task on its evaluation data")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value (repeatable)")
    bench.add_argument("--output-dir", help="write bench.json, bench.md and the plots (metric vs latency and size)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    bench.add_argument("--seq-len", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch size (median)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP + " (every MODEL's)")
    stages = commands.add_parser("stages", help="the recipe stages this installation knows: built-in ones and those "
                                 "that installed packages register (entry point group hf_modelopt.stages)")
    stages.add_argument("--json", action="store_true", help="print JSON instead of a table")
    push = commands.add_parser("push", help="upload a verified export folder to the Hugging Face Hub")
    push.add_argument("folder", help="an export folder (OUTPUT of `hf-modelopt run`)")
    push.add_argument("--repo-id", required=True, help="Hub model repository ORG/NAME (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--dry-run", action="store_true", help="print the files and card that would be uploaded")
    return parser


def _load_any(path: str, trust_remote_code: bool, **kwargs):
    """A saved model with its head, whatever the task (the class named in its config)."""
    import transformers

    from .inspection import load_config

    config = load_config(path, trust_remote_code, **kwargs)
    if config is None:
        from .errors import UserError

        raise UserError(f"{path}: no config.json: not a saved model (a peft adapter folder is evaluated with `eval`)")
    architecture = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, architecture, transformers.AutoModel)
    return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def _require_packages_to_load(path: str, gguf_file: str | None = None) -> None:
    """Refuse, before anything loads, a model whose file format needs an optional package that is not installed."""
    from .extras import require_extra
    from .modeling import ModelConfig, required_packages

    for feature, modules in required_packages(ModelConfig(name_or_path=path, gguf_file=gguf_file)).values():
        require_extra(f"{path}: {feature}", *modules)


def _bench(args) -> int:
    from .benchmark import folder_candidate, format_benchmark, run_benchmark, write_benchmark
    from .extras import require_extra

    # Optional packages first: a missing one must not cost the minutes of loading and timing models.
    if args.recipe and args.output_dir:
        require_extra("bench's plots (--recipe with --output-dir)", "matplotlib")
    for path in args.models:
        _require_packages_to_load(path)
    recipe = None
    if args.recipe:
        from .pipeline import preflight
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe)
    task = recipe.task if recipe is not None else "text-classification"
    candidates = [folder_candidate(path, task, trust_remote_code=args.trust_remote_code) for path in args.models]
    result = run_benchmark(candidates, recipe, tuple(args.batch_sizes), args.seq_len, args.repeats,
                           memory=not args.no_memory)
    if args.output_dir:
        for path in write_benchmark(result, args.output_dir):
            logger.info("bench: wrote %s", path)
    print(json.dumps(result, indent=2) if args.json else format_benchmark(result))
    return 0


def _run(args) -> int:
    from .interrupt import RunInterrupted
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .distributed import is_main_process

    try:
        result = run_recipe(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                            rerun_from=args.rerun_from)
    except RunInterrupted as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}{_where(stop)}; resume with: "
              f"{resume_command(args)}", file=sys.stderr)
        return stop.exit_code
    if not is_main_process():
        return 0  # the main process prints the summary
    print(run_summary(result))
    return 0


def _values(metrics: dict | None) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (metrics or {}).items())


def run_summary(result) -> str:
    """The end-of-run summary: each stage (run or reused, time, its figures) and the export's measurements."""
    lines = [f"\nDone. Final model, card and metrics in {result['output_dir']}", "", "stages:"]
    for record in result["stages"]:
        how = "reused" if record.get("reused") else (f"{record['seconds']:.0f} s" if "seconds" in record else "")
        lines.append(f"  {record['name']:<18} {record['type']:<17} {how:>8}  {_values(record.get('metrics'))}")
    export = Path(result["output_dir"]) / "export.json"
    if export.is_file():
        figures = json.loads(export.read_text()).get("figures") or {}
        mine, base = figures.get("export") or {}, figures.get("base") or {}
        parts = []
        if mine.get("size_on_disk_bytes"):
            ratio = base["size_on_disk_bytes"] / mine["size_on_disk_bytes"] if base.get("size_on_disk_bytes") else None
            parts.append(f"{mine['size_on_disk_bytes'] / 1e6:.1f} MB on disk" + (
                "" if ratio is None else f" ({ratio:.2f}x smaller than the base's files)" if ratio >= 1 else
                f" ({1 / ratio:.2f}x larger than the base's files)"))
        if mine.get("latency_ms") and base.get("latency_ms"):
            parts.append(f"{base['latency_ms'] / mine['latency_ms']:.2f}x the base model's CPU speed "
                         f"({mine['latency_ms']:.0f} vs {base['latency_ms']:.0f} ms, batch 32 x 64)")
        if parts:
            lines += ["", "export (re-measured in a fresh process): " + "; ".join(parts)]
    return "\n".join(lines)


def resume_command(args) -> str:
    """The command line that continues this `run` (the same recipe, output folder and overrides)."""
    words = ["hf-modelopt", "run", args.recipe, "--output-dir", args.output_dir]
    for override in args.overrides:
        words += ["--set", override]
    if args.rerun_from:
        words += ["--rerun-from", args.rerun_from]
    return shlex.join(words + ["--resume"])


def _where(stop) -> str:
    if stop.checkpoint:
        return f" in stage '{stop.stage}': checkpoint of step {stop.step} saved in {stop.checkpoint}"
    return " (no training step in progress, nothing to save)"


def _eval(args) -> int:
    from .inspection import load_config
    from .metrics import evaluate_model
    from .modeling import load_model, load_tokenizer
    from .pipeline import preflight
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _require_packages_to_load(args.model)
    load_config(args.model, args.trust_remote_code)  # before any work: a model whose code the user did not allow
    preflight(recipe)
    # MODEL is not the recipe's model: whether its code may run is the --trust-remote-code flag's to say.
    spec = recipe.model.model_copy(update={"trust_remote_code": args.trust_remote_code})
    if os.path.isdir(args.model):  # an export folder loads the way its format does (peft adapters, ...)
        from .formats.detect import load_exported
        from .tasks import get_task

        task = get_task(recipe.task)
        model = load_exported(args.model, task.auto_class, task.peft_auto_class,
                              trust_remote_code=args.trust_remote_code)
    else:
        model = load_model(spec, recipe.task, path=args.model)
    tokenizer = load_tokenizer(spec, path=args.model, task=recipe.task)
    metrics = evaluate_model(model, tokenizer, recipe.data, task=recipe.task)
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


def _push(args) -> int:
    from .export.hub import plan_push, push_export

    if args.dry_run:
        plan = plan_push(args.folder, args.repo_id, args.private)
        print(f"would upload to {plan.repo_id} ({'private' if plan.private else 'public'}):")
        print("\n".join(f"  {name}" for name in plan.files))
        print(f"\n{plan.card}")
        return 0
    print(push_export(args.folder, args.repo_id, private=args.private))
    return 0


def _stages(args) -> int:
    from .stages import STAGES, load_builtin_stages

    load_builtin_stages()
    rows = [{"stage": name, "config": spec.config_cls.__name__, "module": spec.origin,
             "description": (spec.config_cls.__doc__ or "").strip().splitlines()[0] if spec.config_cls.__doc__ else ""}
            for name, spec in sorted(STAGES.items())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(row["stage"]) for row in rows)
    for row in rows:
        print(f"{row['stage']:<{width}}  {row['module']:<28}  {row['description']}")
    return 0


def _inspect(args) -> int:
    from .inspection import format_report, inspect_model

    _require_packages_to_load(args.model, args.gguf_file)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = _load_any(args.model, args.trust_remote_code, **kwargs)
    report = inspect_model(model, args.model if os.path.isdir(args.model) else None, args.gguf_file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def remote_code_refusal(err: ValueError, args) -> str | None:
    """One line for transformers' refusal to load a model that ships its own code (`trust_remote_code=False`),
    naming the setting that allows it; `None` for any other error."""
    import re

    from .errors import clip

    found = re.search(r"The repository (.+?) contains custom code which must be executed", str(err))
    if found is None:
        return None
    allow = "set model.trust_remote_code: true in the recipe" if args.command == "run" else \
        "pass --trust-remote-code"
    return (f"{clip(found.group(1))}: the model ships its own Python code (auto_map in its config), which runs when "
            f"it loads; nothing was run. If you trust its author, {allow}")


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
        return {"run": _run, "eval": _eval, "inspect": _inspect, "bench": _bench, "stages": _stages,
                "push": _push}[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        refusal = remote_code_refusal(err, args)
        if refusal is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
