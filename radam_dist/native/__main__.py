"""``python -m radam_dist.native``: compile the one-pass CPU kernel into the cache now (the
first training step would otherwise do it) and print where it is."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radam_dist.native",
        description="Compile radam_dist's one-pass CPU kernel for this machine and TensorFlow "
                    "(about 10 s; kept in a cache, so later runs load it at once).")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $RADAM_DIST_NATIVE_CACHE, else "
                             "~/.cache/radam_dist/native)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from radam_dist import native  # pylint: disable=import-outside-toplevel

    try:
        path = native.build(args.cache)
        native._load(path)  # pylint: disable=protected-access
    except native.BuildError as error:
        print(f"radam_dist.native: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
