"""Region-feature datasets for vision-and-language pretraining.

On-disk format (``fastvl-regions``, version 1) — one directory::

    DIR/
      index.json            {"format": "fastvl-regions", "version": 1, "feature_dim": D, "num_classes": C,
                             "num_images": n_total, "source": "...",
                             "shards": [{"name": "shard-00000", "num_images": n, "num_regions": R}, ...]}
      vocab.txt             WordPiece vocabulary (BERT's for real data; trained for the synthetic set)
      shard-00000/
        features.npy        float16 [R, D]   pooled RoI features of every region of the shard's n images,
                                             image after image
        boxes.npy           float32 [R, 4]   pixel boxes x1, y1, x2, y2
        cls_prob.npy        float16 [R, C]   the detector's class distribution per region (KL target)
        num_regions.npy     int32   [n]      regions per image (image i's rows start at sum of the earlier)
        image_size.npy      int32   [n, 2]   image height, width in pixels
        captions.jsonl      n lines {"image_id": "...", "caption": "..."}: line i describes image i
        pixels.npy          uint8   [n, H, W, 3]  optional: the images themselves (RGB, all at one size),
                                             present when index.json has "pixels": [H, W] (ALBEF reads them)

Every ``.npy`` is a plain numeric array, opened with ``np.load(mmap_mode="r", allow_pickle=False)``:
nothing is unpickled, and workers share the page cache. An image with several captions is stored
once per caption. ``index.json`` is written last, so a directory without it is an unfinished write.
Pixels are optional and announced by the index ("pixels" absent = a region-feature-only set, as every
set written before pixels existed): version 1 covers both, and a reader that ignores the key reads the
rest unchanged. ``fastvl data synth --image-size N`` renders them.

Reading (:class:`RegionDataset`): captions are tokenised once at open (no [CLS]/[SEP]; the collator
adds them). A missing, truncated or inconsistent file raises :class:`DataError` naming the file (and
the line for captions; for a truncated ``pixels.npy`` also the first record cut off), and a model that
needs pixels on a set without them is a :class:`DataError` naming ``index.json``. Records that cannot
train — an image with 0 regions, a caption with no word pieces — are skipped, counted in
``dataset.skipped`` and logged once with examples; ``strict=True`` (``--strict-data``) makes them errors
naming file, line and image id.

Modules: :mod:`~fastvl.data.format` (writer / reader), :mod:`~fastvl.data.tokenizer` (WordPiece),
:mod:`~fastvl.data.synth` (the synthetic set), :mod:`~fastvl.data.convert` (BUTD TSV, ViLBERT LMDB:
msgpack rows decoded safely, pickled rows only with ``--trust-pickle``),
:mod:`~fastvl.data.collate` (ViLBERT / VL-BERT masking, padding, packing), :mod:`~fastvl.data.collate_albef`
(ALBEF's captions, masking and normalised images), :mod:`~fastvl.data.sampler` (seeded,
resumable, data-parallel batches), :mod:`~fastvl.data.cli` (``fastvl data``).
"""

from fastvl.data.format import DataError, Example, ImageRecord, RegionDataset, ShardWriter, write_dataset

__all__ = ["DataError", "Example", "ImageRecord", "RegionDataset", "ShardWriter", "write_dataset"]
