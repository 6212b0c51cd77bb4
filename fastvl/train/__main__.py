"""``deepspeed [--num_gpus N | --hostfile H] -m fastvl.train ARGS`` (= ``fastvl pretrain ARGS`` on every rank)."""

import argparse
import sys

from fastvl.train import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastvl.train", description=cli.__doc__)
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args()))
