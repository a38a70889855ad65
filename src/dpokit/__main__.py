"""`python -m dpokit ...`: the `dpokit` command (also each process of a data-parallel launch)."""

from dpokit.cli import main
from dpokit.launch import exit_process

if __name__ == "__main__":
    exit_process(main())
