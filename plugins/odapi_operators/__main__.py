"""`python -m odapi_operators` is the same as the `odapi` command."""

from odapi_operators.cli import main

raise SystemExit(main())
