"""`python -m modelctl`: the same entry point as the `modelctl` console script."""

from __future__ import annotations

from modelctl.cli import main

if __name__ == "__main__":
    main()
