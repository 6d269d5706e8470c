"""Put the seconds since start in front of every line a command prints, so one run's log gives the time of
each stage (check, cache, loading, first step, saves) for docs/benchmarks.md. Progress-bar updates
(separated by carriage returns) count as lines.

    wanpair train wanpair.toml 2>&1 | python3 -u bench/stamp_lines.py > train.log
"""

import sys
import time


def main() -> None:
    start, line = time.time(), []

    def emit() -> None:
        if "".join(line).strip():
            sys.stdout.write(f"[{time.time() - start:8.1f}] {''.join(line)}\n")
            sys.stdout.flush()
        line.clear()

    for char in iter(lambda: sys.stdin.read(1), ""):
        if char in "\r\n":
            emit()
        else:
            line.append(char)
    emit()

if __name__ == "__main__":
    main()
