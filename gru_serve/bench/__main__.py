"""python -m gru_serve.bench: the same as `gru-serve bench`."""

import argparse
import sys

from gru_serve.bench.run import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m gru_serve.bench", description="The same as gru-serve bench.")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
