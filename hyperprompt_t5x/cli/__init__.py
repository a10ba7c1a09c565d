"""The `hyperprompt-t5x` / `t5x` command line (`commands.main`)."""
