"""What every script does around its main(): concise logging, and user errors without tracebacks."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from library.errors import PentadactylError

log = logging.getLogger("pentadactyl")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    # third-party chatter that says nothing useful to a user of this toolkit
    for name in ("diffusers", "transformers", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def job_from_command_line(script: str, argv: list[str]):
    """The script's job from `--config job.toml --key value …`; with `--print_config`, print the resolved
    job as TOML and exit instead."""
    from library.config import load_job

    job = load_job(script, [a for a in argv if a != "--print_config"])
    if "--print_config" in argv:
        sys.stdout.write(job.to_toml())
        raise SystemExit(0)
    return job


def run_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a script's main; a PentadactylError prints its message and exits with status 2."""
    setup_logging()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except PentadactylError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # before training started (the loop itself saves and exits cleanly)
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
