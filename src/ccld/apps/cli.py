"""The `ccld` command: generate (`ccld.apps.generate`), serve (`ccld.apps.web`), the training
commands (`ccld.training.commands`), download, convert, info, cache.

Problems the user can fix arrive as `CCLDError` and are printed as one line with exit status 2.
This module imports only the standard library and ccld's light modules: torch and the models
load inside `main`, so that Ctrl-C during start-up is "ccld: interrupted", not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .._version import __version__
from ..errors import CCLDError, option_words


def cmd_download(args) -> int:
    from .options import download_defaults

    for p in download_defaults(args.cloob):
        print(p)
    return 0


def cmd_convert(args) -> int:
    from .generate import check_writable_folder
    from .options import load_pipeline

    output = Path(args.output)
    check_writable_folder(output, "the output folder")
    pipe = load_pipeline(args)
    folder = pipe.save_pretrained(output)
    print(f"wrote {folder}; use it with `ccld generate --model {folder}` or "
          f"CCLDPipeline.from_pretrained({str(folder)!r})")
    return 0


def cmd_info(args) -> int:
    from .options import describe_checkpoint

    info = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def cmd_cache(args) -> int:
    from ..io import weights_cache
    from ..pipeline import compiled

    converted = weights_cache.converted_dir()
    packages = compiled.packages()
    package_bytes = sum(path.stat().st_size for path in packages)
    if args.action == "clear":
        if converted is None:
            print(f"the converted-weights cache is off ({weights_cache.ENV_VAR}=off); "
                  "nothing to clear")
            return 0
        removed, freed = weights_cache.clear_converted()
        for path in packages:
            path.unlink(missing_ok=True)
        print(f"removed {removed} entries ({_megabytes(freed)}) from {converted}"
              + (f" and {_count(len(packages), 'compiled U-Net')} ({_megabytes(package_bytes)})"
                 if packages else "")
              + "; downloads are kept")
        return 0
    print(f"cache folder: {weights_cache.cache_root()}")
    if converted is None:
        print(f"converted weights: off ({weights_cache.ENV_VAR}=off)")
        return 0
    entries = weights_cache.cache_entries()
    print(f"converted weights: {converted}")
    for entry in entries:
        sources = ", ".join(entry.sources) or "?"
        print(f"  {entry.folder.name}  {_megabytes(entry.size):>10}  {entry.kind:<10} {sources}")
    total = sum(entry.size for entry in entries)
    print(f"{len(entries)} entries, {_megabytes(total)}")
    if packages:
        print(f"compiled U-Nets (`--compile`): {packages[0].parent}, "
              f"{_count(len(packages), 'package')}, {_megabytes(package_bytes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .options import add_model_options

    p = argparse.ArgumentParser(prog="ccld", description="CLOOB-conditioned latent diffusion: "
                                "paint from text and image prompts.")
    p.add_argument("--version", action="version", version=f"ccld {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .generate import add_generate_command
    from .interpolate import add_interpolate_command

    add_generate_command(sub)
    add_interpolate_command(sub)

    d = sub.add_parser("download", help="fetch the default models into the Hugging Face cache")
    d.add_argument("--cloob", default=None, help="built-in CLOOB config name")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser("convert", help="write a safetensors pipeline folder from release files")
    c.add_argument("output", help="the folder to write")
    add_model_options(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="say what a checkpoint is")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("cache", help="show or clear the converted-weights cache",
                       description="Release files are converted once into safetensors copies "
                       "that later loads memory-map. The folder is CCLD_CACHE_DIR (default: "
                       "beside the Hugging Face cache; CCLD_CACHE_DIR=off turns it off).")
    k.add_argument("action", choices=["info", "clear"],
                   help="info: the folder and its entries; clear: delete the converted copies "
                        "(downloads stay)")
    k.set_defaults(func=cmd_cache)

    from .web import add_serve_command
    add_serve_command(sub)
    from ..training.commands import add_training_commands
    add_training_commands(sub)
    return p


INTERRUPTED = 130  # main's status after Ctrl-C: 128 + SIGINT, what a shell reports for it


def command_words(parser: argparse.ArgumentParser):
    """How the command line names a parameter in a message (see `ccld.errors`): by its option
    (`--steps`, `-n`; `--variation-of SEED` where the message says what to give); a positional
    argument by its metavar."""
    actions = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                for sub_action in subparser._actions:
                    actions.setdefault(sub_action.dest, sub_action)

    def words(name: str, giving: bool, what: str) -> str:
        action = actions.get(name)
        if action is None:
            return option_words(name, giving, what)
        if not action.option_strings:
            return action.metavar or name.upper()
        flag = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])
        return f"{flag} {what}" if giving and what else flag

    return words


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the command's other lines read: one line, not the code that warned."""
    print(f"ccld: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    global _finished_on_disk
    parser = None
    try:  # everything, imports included: Ctrl-C while torch loads is an interruption too
        parser = build_parser()
        args = parser.parse_args(argv)
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line errors
        status = args.func(args)
        _finished_on_disk = status == 0 and getattr(args, "result_on_disk_at_return", False)
        # A first run's converted-weights copies may still be being written: waited for here,
        # where Ctrl-C is an interruption (the interpreter's own wait at exit would print a
        # traceback), and leaves only a temporary that the next writer removes.
        from ..io.weights_cache import finish_writes

        finish_writes()
        return status
    except CCLDError as e:
        message = e.worded(command_words(parser)) if parser is not None else str(e)
        print(f"ccld: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ccld: interrupted", file=sys.stderr)
        return INTERRUPTED


# True after a command whose parser sets `result_on_disk_at_return` (one process's paintings)
# succeeded: the console command then ends without the interpreter's teardown, which frees every
# tensor and module one by one (0.3 s after a painting) and only delays the prompt. Commands that
# may leave work to exit handlers (training's trackers, a launcher's process group) never set it.
_finished_on_disk = False


def _die_of_sigint() -> None:
    """Ends the process by SIGINT itself, as the shell convention asks of an interrupted
    program: a shell loop of `ccld` runs then stops at Ctrl-C instead of starting the next one.
    Python does this on its own only sometimes (it remembers an interrupt that left Python code
    run from C, as parts of a start-up's imports are, even when the interrupt was caught later),
    so without this an interrupted `ccld` ended by status 130 or by the signal, depending on when
    the key was pressed. Nothing is left to tear down: the interruption abandoned the work."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(INTERRUPTED)  # where the signal cannot end it (it is blocked): the same status


def entry() -> None:
    """The `ccld` console command and `python -m ccld`."""
    status = main()
    if status == INTERRUPTED:
        _die_of_sigint()
    # (not under a profiler or a tracer, e.g. coverage: their results are written at exit)
    if _finished_on_disk and sys.getprofile() is None and sys.gettrace() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
