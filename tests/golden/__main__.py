"""``python -m tests.golden``: regenerate the golden curves and print the diff."""

from tests.golden.update import main

if __name__ == "__main__":
    main()
