"""Run every benchmark in bench/ one after the other, each in its own process, and print
their reports (``scripts/dev bench``). Extra arguments go to serving.py.

    python bench/run_all.py [serving.py arguments]

Exit status: the first nonzero status of a benchmark, else 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    extra = sys.argv[1:] if argv is None else argv
    benchmarks = [
        [str(BENCH_DIR / "serving.py"), *extra],
        [str(BENCH_DIR / "memory_lean.py")],
        [str(BENCH_DIR / "telemetry_overhead.py")],
        [str(BENCH_DIR / "footprint.py")],
    ]
    status = 0
    started = time.monotonic()
    for cmd in benchmarks:
        name = Path(cmd[0]).name
        print(f"\n===== {name} =====", flush=True)
        t0 = time.monotonic()
        code = subprocess.run([sys.executable, *cmd], check=False).returncode
        print(f"===== {name}: exit {code}, {time.monotonic() - t0:.0f} s =====", flush=True)
        status = status or code
    print(f"\nbench: all done in {time.monotonic() - started:.0f} s; "
          f"reports in {BENCH_DIR / 'out'}")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
