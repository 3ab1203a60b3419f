"""`python -m yitrt` runs the CLI."""

from yitrt.cli.app import main

if __name__ == "__main__":
    main()
