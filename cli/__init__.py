"""Command-line entry points, above every other package: `scan` (cli/main.py) and `make demo`
(cli/demo.py). Nothing imports this package."""
