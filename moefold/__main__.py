"""`python -m moefold ...` (also what torchrun launches)."""

from moefold.cli import main

raise SystemExit(main())
