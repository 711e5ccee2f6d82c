"""``python -m dwarf3gpu`` runs the ``dwarf3`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
