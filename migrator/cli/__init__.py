"""The command line: `main` parses (each command registered once with its handler), `commands`
calls the library."""
