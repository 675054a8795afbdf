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


def auth_pair(text: str) -> tuple[str, str]:
    """argparse type of --auth: user:password, both non-empty (the password may hold ':')."""
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise argparse.ArgumentTypeError("--auth takes user:password (both non-empty), e.g. --auth ana:s3cret")
    return user.strip(), password


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """The user:password lines of an --auth-file (blank lines and # comments skipped); ValueError names the file and
    the line that is wrong, or why the file cannot be read."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--auth-file {path}: cannot be read ({error.strerror or error})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                pairs.append(auth_pair(line.strip()))
            except argparse.ArgumentTypeError:
                raise ValueError(f"--auth-file {path}, line {number}: expected user:password") from None
    if not pairs:
        raise ValueError(f"--auth-file {path}: no user:password line in it")
    return pairs


def access_warning(listen: bool, share: bool, credentials: list) -> str | None:
    """What start says when the studio is reachable by others without a password."""
    if credentials or not (listen or share):
        return None
    where = "a public gradio.live link" if share else "every interface (--listen)"
    return (f"serving on {where} without --auth: anyone who can reach it can use the studio, its GPU and its "
            "files; add --auth user:password or --auth-file FILE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from flexip_core.cli import add_model_flags  # argparse only: no torch import

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=port_number, help="port to serve on (default: first free from 7860)")
    parser.add_argument("--listen", action="store_true", help="serve on all interfaces (0.0.0.0), not only localhost")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--auth", type=auth_pair, action="append", default=[], metavar="USER:PASSWORD",
                        help="require this login (Gradio's own authentication); repeat for more users")
    parser.add_argument("--auth-file", default=None, metavar="FILE",
                        help="logins from a file, one user:password a line")
    parser.add_argument("--outputs", default="outputs", metavar="DIR",
                        help="where every render is kept and indexed, across restarts (default: ./outputs)")
    parser.add_argument("--no-scrub", dest="scrub", action="store_false",
                        help="no background renders of the slider's ticks after a render (they cost device time)")
    parser.add_argument("--live-drag", choices=("auto", "on", "off"), default="auto",
                        help="render while the γ slider moves: auto (where one render takes at most 0.75 s), on, off")
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
    from ui.gallery import Gallery
    from ui.layout import build_studio, launch_options, studio_folder
    from ui.scrub import Scrubber
    from ui.state import Studio

    profile = args.profile or default_profile()
    try:  # a bad profile, device or dtype is refused now, not after the server is up
        if TASKS.get(load_profile(profile).pipeline) != "text-to-image":
            raise ValueError(f"profile {profile!r} is for one task ({load_profile(profile).pipeline}); the studio "
                             "starts on a text-to-image profile and offers the other tasks as its modes (Start image, "
                             "Inpaint, Control)")
        device = pick_device(args.device)  # an unknown device, or CUDA on the CPU build of torch
        pick_dtype(args.dtype, device)
        credentials = args.auth + (read_auth_file(args.auth_file) if args.auth_file else [])
        gallery = Gallery.open(args.outputs)  # a folder that cannot be written is refused now, by name
    except ValueError as error:
        raise SystemExit(f"app.py: error: {error}") from None
    engine = CoreEngine(profile, model_options(args))  # the same flags as the command line

    folder = studio_folder()  # photos and results of this run, served as they are; removed on exit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    scrubber = Scrubber(enabled=args.scrub, live_drag=args.live_drag)  # the slider's ticks, renders while dragging
    demo = build_studio(Studio(engine=engine, folder=folder, gallery=gallery, scrubber=scrubber))
    demo.launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
        max_file_size=DEFAULT_LIMITS.max_bytes, show_error=True, prevent_thread_lock=True,
        allowed_paths=[str(gallery.images_folder), str(gallery.subjects_folder)],  # not its index, nothing else
        footer_links=["api", "gradio"], auth=credentials or None, **launch_options(),
    )
    logger.info("FlexIP Studio serving on %s (profile %s%s); renders kept in %s (%d so far)", demo.local_url, profile,
                f", login required for {len(credentials)} user(s)" if credentials else "", gallery.folder,
                gallery.count())
    warning = access_warning(args.listen, args.share, credentials)
    if warning:
        logger.warning(warning)
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
