"""One module per command-line tool; each parses flags into a typed config and calls the layers below."""
