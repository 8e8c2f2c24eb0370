"""Waits until a tritonserver answers ready: python3 -m perf.wait_ready --url http://localhost:8000 --timeout 300"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.request


def wait_ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2).status == 200:
                return True
        except OSError:
            pass
        time.sleep(1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args(argv)
    if wait_ready(args.url, args.timeout):
        return 0
    print(f"server at {args.url} not ready within {args.timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
