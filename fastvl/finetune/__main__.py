"""``deepspeed [--num_gpus N | --hostfile H] --module fastvl.finetune ARGS`` (= ``fastvl finetune ARGS`` on every rank)."""

import argparse
import sys

from fastvl.finetune import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastvl.finetune", description=cli.__doc__)
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args()))
