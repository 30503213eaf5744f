"""What every subcommand does the same way: how a pipeline is named, how examples are shown."""

from __future__ import annotations

import argparse

__all__ = ["add_device_argument", "add_pipeline_argument", "add_precision_argument",
           "add_tracking_argument", "examples", "options_of", "pipeline_of"]


def examples(parser: argparse.ArgumentParser, *lines: str) -> None:
    """End ``parser``'s ``--help`` with examples (its description keeps its own wrapping)."""
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_pipeline_argument(parser: argparse.ArgumentParser, *, what: str = "the pipeline") -> None:
    """``--pipeline NAME|PATH``, as every command takes it (a bare first argument is still
    accepted, as older scripts give it)."""
    parser.add_argument("--pipeline", dest="pipeline", metavar="NAME|PATH",
                        help=f"{what}: a name from 'medvision pipelines list', or a folder")
    parser.add_argument("pipeline_positional", nargs="?", metavar="PIPELINE",
                        help=argparse.SUPPRESS)


def pipeline_of(args: argparse.Namespace) -> str:
    """The pipeline named by ``--pipeline`` or the bare argument.

    Raises:
        ConfigError: neither, or two different ones.
    """
    from medvision.errors import ConfigError

    named, bare = getattr(args, "pipeline", None), getattr(args, "pipeline_positional", None)
    if named and bare and named != bare:
        raise ConfigError(f"two pipelines given ('{bare}' and --pipeline '{named}'); give one")
    if not (named or bare):
        raise ConfigError("no pipeline given: use --pipeline NAME (see 'medvision pipelines "
                          "list')")
    return str(named or bare)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision float32|bfloat16|float16`` for the forward passes of inference."""
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        default="float32",
                        help="arithmetic of the networks' forward passes (autocast): float32 "
                             "(default), bfloat16, or float16 on a GPU only (exit 2 "
                             "elsewhere); saliency gradients are taken in float32")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N|mps``, as every command that runs a network takes it."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where networks run: auto (a GPU when PyTorch sees one, else the "
                             "CPU), cpu, cuda, cuda:N or mps; one that is not there is an "
                             "error (exit 2) naming what was found")


def add_tracking_argument(parser: argparse.ArgumentParser) -> None:
    """``--tracking [URI|mlflow|tensorboard[:DIR]]``, repeatable (needs medvision[tracking])."""
    parser.add_argument("--tracking", action="append", nargs="?", const="mlflow",
                        metavar="URI",
                        help="record the run in MLflow (alone: $MLFLOW_TRACKING_URI, else a "
                             "local store ./mlflow.db; or a URI such as http://host:5000 or "
                             "sqlite:///runs.db) and/or TensorBoard ('tensorboard', or "
                             "'tensorboard:DIR'); repeatable; a tracker that is down never "
                             "stops the work (needs medvision[tracking])")


_NOT_OPTIONS = {"run", "argv", "verbose", "quiet", "log_level", "log_json", "debug",
                "pipelines_dir", "command", "signing_key", "audit_log", "audit_key", "user"}


def options_of(args: argparse.Namespace) -> dict[str, object]:
    """The command-line options of a command as a tracker records them (what was given)."""
    return {k: (str(v) if not isinstance(v, int | float | str | bool) else v)
            for k, v in vars(args).items()
            if k not in _NOT_OPTIONS and v is not None and v != [] and v is not False
            and not callable(v)}
