"""`python -m lightserve.api_server`: start a lightserve instance (see `--help`)."""

from lightserve.launcher import main

if __name__ == "__main__":
    main()
