"""`python -m lightserve.api_server`: start a lightserve instance (see `--help`)."""

if __name__ == "__main__":
    # Imported here, not at the top: every child process started with `spawn` imports this main
    # module again (as `__mp_main__`), and the launcher pulls in torch and the model code, which
    # the router and the cache manager must not load.
    from lightserve.launcher import main

    main()
