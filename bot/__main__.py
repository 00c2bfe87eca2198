"""`python -m bot` is the same as the `ritmo` console script."""

from bot.cli import main

raise SystemExit(main())
