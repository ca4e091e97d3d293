"""Regenerate the committed sample model repository: ``python models/generate.py [DIR]``.

The models are deterministic, so regenerating leaves git clean unless the generator changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edged.samples import make_sample_repository


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "repository",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="model repository to write (default: the directory of this script)",
    )
    args = parser.parse_args()
    make_sample_repository(args.repository)
    print(f"sample models written to {args.repository}")


if __name__ == "__main__":
    main()
