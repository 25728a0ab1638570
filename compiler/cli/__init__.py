"""The command line: the parser and dispatch of every subcommand (`main`), and `vitc export` (timm -> ONNX)."""
