"""``esvit-embed``: embeddings of a folder / list of images with a frozen backbone."""

from __future__ import annotations

import argparse
import sys

from esvit.cli.common import add_preprocess_arg
from esvit.cli.export import add_backbone_args, backbone_kwargs, known_errors


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-embed``."""
    p = argparse.ArgumentParser(
        prog="esvit-embed",
        description="Embed a folder (recursive, sorted) or list file of images; resumable shards.",
    )
    add_backbone_args(p)
    add_preprocess_arg(p)
    p.add_argument("--input", required=True,
                   help="image folder, or a text file with one image path per line (path<TAB>label)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="npy", choices=("npy", "pt", "safetensors"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--regions", action="store_true",
                   help="also save region tokens (n, tokens, d) per shard")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000, help="images per resumable shard")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the per-shard files instead of merging them into one file (by "
                        "default the shards are deleted once merged: each embedding is stored once)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an extraction made with other settings in --out (only files "
                        "esvit-embed recorded writing there are deleted; a folder holding other "
                        "files is refused)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import describe_preprocess, run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.embed import embed_images

        res = embed_images(
            args.checkpoint, args.input, args.out, regions=args.regions,
            batch_size=args.batch_size, dtype=args.dtype, format=args.format,
            shard_size=args.shard_size, merge=not args.no_merge, overwrite=args.overwrite,
            preprocess=args.preprocess, **backbone_kwargs(args),
        )
        where = res.embeddings or f"{len(res.shards)} shard(s) in {res.out_dir}"
        print(f"embedded {res.num_images} images (dim {res.dim}) -> {where}; paths: {res.csv}")
        print(f"preprocessing: {describe_preprocess(res.preprocess)}")
        if res.num_bad:
            print(f"skipped {res.num_bad} unreadable image(s): see {res.bad_files}")
        return 0

    return run_cli(_run, (*known_errors(), TimeoutError))  # TimeoutError: stalled decoding


if __name__ == "__main__":
    sys.exit(main())
