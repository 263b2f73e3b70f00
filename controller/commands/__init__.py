"""The `leaktap` command line and its subcommands. Runtime code never imports from here."""
