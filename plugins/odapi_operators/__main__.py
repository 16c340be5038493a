"""`python -m odapi_operators` is the same as the `odapi` command."""

from odapi_operators.cli import main

if __name__ == "__main__":  # Airflow's plugin loader imports every file under plugins/
    raise SystemExit(main())
