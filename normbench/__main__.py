"""``python -m normbench ...``: the same entry point as the ``normbench`` command."""

from normbench.main import main

if __name__ == "__main__":
    main()
