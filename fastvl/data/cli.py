"""``fastvl data``: ``synth`` (the synthetic set), ``convert`` (TSV / LMDB -> shards), ``inspect`` (check a set)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from fastvl.data.format import VOCAB_FILE, DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = actions.add_parser("synth", help="write the deterministic synthetic dataset (and its vocab.txt)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--num-images", type=int, default=2048)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--feature-dim", type=int, default=2048)
    synth.add_argument("--num-classes", type=int, default=24)
    synth.add_argument("--shard-size", type=int, default=512, help="images per shard")
    synth.add_argument("--image-size", type=int, help="also render every image as N x N RGB pixels (ALBEF trains "
                       "on them; albef-tiny: 32, albef-base: 256)")

    convert = actions.add_parser("convert", help="convert bottom-up-attention TSV or ViLBERT LMDB features")
    convert.add_argument("inputs", nargs="+", help=".tsv files, or LMDB paths with --lmdb")
    convert.add_argument("--captions", help="JSONL {image_id, caption} or 'image_id<TAB>caption' lines (required for "
                         "TSV; for LMDB rows that carry a caption, ViLBERT's msgpack ones, it overrides theirs)")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--lmdb", action="store_true", help="inputs are ViLBERT LMDB feature files")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow unpickling pickled LMDB rows (they can execute code: only for files you trust); "
                              "msgpack LMDBs (ViLBERT pretraining) need no flag")
    convert.add_argument("--fields", help="comma-separated TSV column names when the files have no header")
    convert.add_argument("--num-classes", type=int, help="detector classes (TSV without cls_prob)")
    convert.add_argument("--vocab", help="copy this vocab.txt (e.g. BERT's) next to the shards")
    convert.add_argument("--shard-size", type=int, default=1024, help="records per shard")

    from fastvl.data.synth_task import add_arguments as add_synth_task

    add_synth_task(actions)
    inspect = actions.add_parser("inspect", help="open a dataset, tokenise its captions and report counts")
    inspect.add_argument("data", help="dataset directory")
    inspect.add_argument("--vocab", help="vocab.txt (default: DATA/vocab.txt)")
    inspect.add_argument("--strict", action="store_true", help="fail on a record that would be skipped")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except DataError as error:
        print(f"fastvl data: error: {error}")
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        from fastvl.data.synth import make_synthetic_dataset

        index = make_synthetic_dataset(args.out, args.num_images, seed=args.seed, feature_dim=args.feature_dim,
                                       num_classes=args.num_classes, shard_size=args.shard_size,
                                       image_size=args.image_size)
        pixels = f" with {args.image_size} x {args.image_size} pixels" if args.image_size else ""
        print(f"wrote {index['num_images']} images{pixels} in {len(index['shards'])} shards and {VOCAB_FILE} to "
              f"{args.out}")
        return 0
    if args.action == "synth-task":
        from fastvl.data.synth_task import run as run_synth_task

        return run_synth_task(args)
    if args.action == "convert":
        import shutil

        from fastvl.data import convert

        if args.captions is None and not args.lmdb:
            raise DataError("--captions is required for TSV files (they carry no captions)")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise DataError(f"--out {args.out} is an existing file, not a folder")
        if args.vocab:  # checked before hours of conversion, not after
            from fastvl.data.tokenizer import load_tokenizer

            load_tokenizer(args.vocab)
        captions = convert.read_captions(args.captions) if args.captions else {}
        fields = tuple(args.fields.split(",")) if args.fields else None

        def images():
            for path in args.inputs:
                if args.lmdb:
                    yield from convert.read_vilbert_lmdb(path, trust_pickle=args.trust_pickle)
                else:
                    yield from convert.read_butd_tsv(path, fields, args.num_classes)

        index = convert.convert(images(), captions, args.out, shard_size=args.shard_size,
                                source=",".join(os.path.basename(p) for p in args.inputs))
        if args.vocab:
            shutil.copyfile(args.vocab, os.path.join(args.out, VOCAB_FILE))
        print(json.dumps(index["conversion"]))
        print(f"wrote {index['num_images']} records in {len(index['shards'])} shards to {args.out}")
        return 0
    from fastvl.data.format import RegionDataset
    from fastvl.data.tokenizer import load_tokenizer

    dataset = RegionDataset(args.data, load_tokenizer(args.vocab or os.path.join(args.data, VOCAB_FILE)),
                            strict=args.strict)
    lengths = dataset.caption_lengths()
    bad_count, bad = dataset.find_bad_records()
    print(json.dumps({"records": len(dataset), "skipped": dataset.skipped, "feature_dim": dataset.feature_dim,
                      "num_classes": dataset.num_classes, "pixels": dataset.pixel_size,
                      "max_caption_pieces": max(lengths),
                      "mean_caption_pieces": round(sum(lengths) / len(lengths), 2), "bad_records": bad_count}))
    if bad_count:
        for line in bad:
            print(f"fastvl data: bad record: {line}")
        print(f"fastvl data: error: {bad_count} record(s) hold values training cannot use (first {len(bad)} above)")
        return 2
    return 0
