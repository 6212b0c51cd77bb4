"""``fastvl embed``: pooled ALBEF embeddings of a dataset, as LAVIS's feature extractor gives them.

    fastvl embed --checkpoint albef.safetensors --data coco.json --image-root images/ --vocab vocab.txt \\
        --out embeddings.npy

Per image-caption pair: ``image`` = ALBEF's normalised ITC projection of the image [CLS] state
(``embed_dim``, 256), ``text`` = the same for the caption, ``joint`` = the fusion encoder's [CLS] state
(``hidden_size``, 768; LAVIS's multimodal embedding). Written as one structured array (fields
``text``, ``image``, ``joint``, row ``i`` = record ``i``): ``np.load(out)["joint"]`` is ``[N, 768]``;
no pickle is needed to read it. Images are resized to the model's resolution (ALBEF's test
transform), captions cleaned and tokenised as in training.

``--checkpoint``: a fastvl ALBEF state dict with its ``<checkpoint>.json`` sidecar (what ``fastvl
convert albef`` writes), loaded with safetensors or ``torch.load(weights_only=True)``. ``--data``: an
``{image, caption}`` JSON / JSONL file (``--image-root`` for relative paths) or a shard directory
with pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fastvl ALBEF .safetensors (+ its .json sidecar)")
    parser.add_argument("--data", required=True, help="{image, caption} .json / .jsonl file, or a shard directory")
    parser.add_argument("--out", required=True, help="output .npy (a structured array: text, image, joint)")
    parser.add_argument("--vocab", help="WordPiece vocab.txt (default: DATA/vocab.txt for a shard directory)")
    parser.add_argument("--image-root", default="", help="joined to relative image paths of a .json / .jsonl file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--max-text-len", type=int, default=25)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_albef(checkpoint: str):
    """The ALBEF model of a fastvl checkpoint and its sidecar (eval mode, float32)."""
    from fastvl.convert.common import load_state_dict_file
    from fastvl.models.albef import ALBEF, ALBEFConfig

    sidecar_path = checkpoint + ".json"
    if not os.path.isfile(sidecar_path):
        raise ValueError(f"{sidecar_path} not found: --checkpoint needs the sidecar `fastvl convert albef` writes "
                         "(the model class and its config)")
    with open(sidecar_path, encoding="utf-8") as handle:
        sidecar = json.load(handle)
    if not str(sidecar.get("class", "")).endswith(".ALBEF"):
        raise ValueError(f"{sidecar_path}: names {sidecar.get('class')}; `fastvl embed` reads ALBEF checkpoints")
    state = load_state_dict_file(checkpoint)
    model = ALBEF(ALBEFConfig(**sidecar["config"]), with_mlm_head=any(k.startswith("text_encoder.mlm_head.")
                                                                       for k in state))
    model.load_state_dict(state, strict=True)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from fastvl.data.collate_albef import ALBEFCollator
    from fastvl.data.format import VOCAB_FILE, DataError, RegionDataset
    from fastvl.data.images import ImageCaptionDataset
    from fastvl.data.tokenizer import load_tokenizer, special_ids

    try:
        model = load_albef(args.checkpoint)
        tokenizer = load_tokenizer(args.vocab or os.path.join(args.data, VOCAB_FILE))
        if args.data.endswith((".json", ".jsonl")):
            dataset = ImageCaptionDataset(args.data, tokenizer, image_root=args.image_root,
                                          image_res=model.config.image_res, augment=False)
        else:
            dataset = RegionDataset(args.data, tokenizer)
            size = dataset.require_pixels("fastvl embed")
            if size != (model.config.image_res, model.config.image_res):
                raise DataError(f"{args.data}: images are {size[0]} x {size[1]}, the model reads "
                                f"{model.config.image_res} px")
    except (ValueError, FileNotFoundError) as error:  # DataError and ConversionError are ValueErrors
        print(f"fastvl embed: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    collator = ALBEFCollator(dataset, special_ids(tokenizer), tokenizer.get_vocab_size(), max_text_len=args.max_text_len)
    keys = [(0, index) for index in range(len(dataset))]
    loader = torch.utils.data.DataLoader(keys, batch_size=args.batch_size, collate_fn=collator,
                                         num_workers=args.num_workers)
    c = model.config
    rows = np.zeros(len(dataset), dtype=[("text", np.float32, (c.embed_dim,)), ("image", np.float32, (c.embed_dim,)),
                                         ("joint", np.float32, (c.hidden_size,))])
    start = 0
    progress = tqdm(total=len(dataset), unit="pair", desc="embed", disable=args.no_progress or not sys.stderr.isatty())
    with torch.no_grad():
        for batch in loader:
            text, image, joint = embed_batch(model, batch["images"].to(device), batch["input_ids"].to(device),
                                             batch["attention_mask"].to(device))
            stop = start + text.shape[0]
            rows["text"][start:stop], rows["image"][start:stop] = text.cpu().numpy(), image.cpu().numpy()
            rows["joint"][start:stop] = joint.cpu().numpy()
            start = stop
            progress.update(text.shape[0])
    progress.close()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    np.save(args.out, rows)
    print(f"wrote {len(rows)} x (text {c.embed_dim}, image {c.embed_dim}, joint {c.hidden_size}) embeddings to "
          f"{args.out}")
    return 0


def embed_batch(model, images, input_ids, attention_mask):
    """``(text [B, embed_dim], image [B, embed_dim], joint [B, hidden])``: the ITC projections of both
    [CLS] states and the fusion encoder's [CLS] state."""
    image_tokens, image = model.image_features(images)
    text_states, text = model.text_features(input_ids, attention_mask)
    joint = model.text_encoder.fuse(text_states, attention_mask, image_tokens)[:, 0]
    return text, image, joint
