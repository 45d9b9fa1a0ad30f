"""The command line's commands: one module each, with its flags and its run function (cli.py assembles them)."""
