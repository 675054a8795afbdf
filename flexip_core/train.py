"""Train the FlexIP adapters (the loop: flexip_core.training.train; settings: flexip_core.training.config).

    python -m flexip_core.train --config assets/train/tiny.toml --set manifest=PATH --set output_dir=runs/tiny
    accelerate launch -m flexip_core.train --config train.toml [--set max_steps=100 ...]
    accelerate launch -m flexip_core.train --config assets/train/sdxl.toml --set manifest=PATH --set output_dir=OUT
    torchrun --nproc_per_node 2 -m flexip_core.train --config train.toml      # on CPU: gloo
"""
from __future__ import annotations

import argparse
import logging
import sys

from flexip_core.training.config import load_config, parse_overrides
from flexip_core.training.train import train

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m flexip_core.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (.json or .toml); fields: TrainConfig")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (value parsed as JSON when it is), e.g. --set max_steps=100")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, parse_overrides(args.set))
        result = train(config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("done: %s (%.3f s per step)", result.adapter_path, result.seconds_per_step)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that loggers are named flexip_core.train rather than __main__.
    from flexip_core.train import main as _main

    sys.exit(_main())
