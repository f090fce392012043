"""The `facediff` command line: `main.py` (the app and its commands), `prepare.py` (`facediff prepare ...`),
`errors.py` (the one-line `error:` exits every command shares)."""
