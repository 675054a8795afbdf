"""FlexIP Studio: `python app.py` serves the studio on http://127.0.0.1 (next free port from 7860).

Models are not loaded at import or before the page is served: loading starts in the background once the
server is up (or on the first render with --no-preload), and the page shows its progress."""
from __future__ import annotations

import argparse
import atexit
import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger("flexip_studio")


def port_number(text: str) -> int:
    """argparse type of --port: 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 1 to 65535, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from flexip_core.cli import add_model_flags  # argparse only: no torch import

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=port_number, help="port to serve on (default: first free from 7860)")
    parser.add_argument("--listen", action="store_true", help="serve on all interfaces (0.0.0.0), not only localhost")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        help="load the models on the first render instead of right after the server starts")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                        help="logging level")
    add_model_flags(parser.add_argument_group("model (as for python -m flexip_core generate)"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from flexip_core.cli import model_options
    from flexip_core.generation.devices import pick_device, pick_dtype
    from flexip_core.generation.images import DEFAULT_LIMITS
    from flexip_core.generation.pipeline import TASKS
    from flexip_core.loading.profiles import default_profile, load_profile
    from ui.engine import CoreEngine
    from ui.layout import build_studio, launch_options, studio_folder
    from ui.state import Studio

    profile = args.profile or default_profile()
    try:  # a bad profile, device or dtype is refused now, not after the server is up
        if TASKS.get(load_profile(profile).pipeline) != "text-to-image":
            raise ValueError(f"profile {profile!r} is for one task ({load_profile(profile).pipeline}); the studio "
                             "starts on a text-to-image profile and offers the other tasks as its modes (Start image, "
                             "Inpaint, Control)")
        device = pick_device(args.device)  # an unknown device, or CUDA on the CPU build of torch
        pick_dtype(args.dtype, device)
    except ValueError as error:
        raise SystemExit(f"app.py: error: {error}") from None
    engine = CoreEngine(profile, model_options(args))  # the same flags as the command line

    folder = studio_folder()  # photos and results of this run, served as they are; removed on exit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    demo = build_studio(Studio(engine=engine, folder=folder))
    demo.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
        max_file_size=DEFAULT_LIMITS.max_bytes, allowed_paths=[], show_error=True, prevent_thread_lock=True,
        footer_links=["api", "gradio"], **launch_options(),
    )
    logger.info("FlexIP Studio serving on %s (profile %s)", demo.local_url, profile)
    if args.preload:
        threading.Thread(target=_preload, args=(engine,), name="flexip-preload", daemon=True).start()
    threading.Thread(target=_prune_hourly, args=(folder,), name="flexip-prune", daemon=True).start()
    demo.block_thread()


def _exit_on_terminate(*_) -> None:
    """`kill` ends the app through atexit too (removing its output folder); later signals are ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def _prune_hourly(folder: Path) -> None:
    from ui.files import prune
    from ui.layout import FILES_KEPT_S

    while True:
        time.sleep(3600)
        prune(folder, FILES_KEPT_S)


def _preload(engine) -> None:
    try:
        engine.load()
    except ValueError as error:  # a bad path, profile or file: its message says what to fix (the header shows it)
        logger.error("the %s models could not be loaded: %s", engine.profile, error)
    except Exception:  # unexpected: with its traceback; the header and the first render report it; keep serving
        logger.exception("preloading the %s models failed", engine.profile)


if __name__ == "__main__":
    main()
