"""``esvit-correspondence``: flip correspondence of a backbone's region features (the official
EsViT ``analyze_models.py --measure_correspondence`` protocol) on a folder of images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMAND = "esvit-correspondence"

def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-correspondence``."""
    p = argparse.ArgumentParser(
        prog="esvit-correspondence",
        description="Match every region token of an image to the tokens of its flipped copy (cosine of the "
                    "backbone's region features) and score how often the match is the mirrored position.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint, exported backbone or (with --backbone) a state dict")
    src.add_argument("--random", action="store_true",
                     help="score the randomly initialised --backbone (the baseline to compare with)")
    p.add_argument("--key", "--checkpoint-key", dest="key", default="teacher", choices=("teacher", "student"),
                   help="weights of a training checkpoint")
    p.add_argument("--backbone", help="registry name (bare state dicts and --random)")
    p.add_argument("--backbone-kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="backbone options for --random, e.g. patch_size=4 image_size=32")
    p.add_argument("--images", required=True, help="image folder (recursive) or a list file")
    p.add_argument("--image-size", type=int,
                   help="input side (default: the checkpoint's training crop size, else 224)")
    p.add_argument("--jitter", action="store_true",
                   help="colour-jitter (p 0.8) and grey the flipped copy, as the official measure does")
    p.add_argument("--top-k", type=int, default=10, help="most similar pairs scored by accuracy_topk")
    p.add_argument("--max-images", type=int, help="score only the first N images (sorted order)")
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter parameters")
    p.add_argument("--per-image", action="store_true", help="also write every image's scores")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="JSON output (default: <checkpoint dir>/correspondence.json; stdout only "
                                 "with --random); an existing file is replaced only if "
                                 "esvit-correspondence wrote it")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging
    from esvit.cli.export import known_errors

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        import yaml

        from esvit.eval.correspondence import measure_correspondence
        from esvit.eval.outputs import check_replaceable_json, write_owned_json

        out = args.out or (None if args.random else str(Path(args.checkpoint).parent / "correspondence.json"))
        if out:
            check_replaceable_json(out, COMMAND)  # refuse before the measurement, not after
        if args.random:
            if not args.backbone:
                raise ValueError("--random needs --backbone NAME (see esvit.list_backbones())")
            from esvit.backbones import build_backbone

            kwargs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.backbone_kw)}
            backbone = build_backbone(args.backbone, **kwargs)
        else:
            if args.backbone_kw:
                raise ValueError("--backbone-kw applies to --random only (a checkpoint records its options)")
            backbone = args.checkpoint
        res = measure_correspondence(
            backbone, args.images, image_size=args.image_size, jitter=args.jitter, top_k=args.top_k,
            seed=args.seed, max_images=args.max_images, checkpoint_key=args.key, backbone_name=args.backbone,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, per_image=args.per_image,
        )
        g = res["grid"]
        print(f"accuracy all {100 * res['accuracy_all']:.1f}%, top-{res['settings']['top_k']} "
              f"{100 * res['accuracy_topk']:.1f}%, distance {res['distance_all']:.2f} tokens "
              f"(flip correspondence on {res['images']} images, {g[0]}x{g[1]} = {res['n_tokens']} "
              f"tokens each; chance {100 * res['chance']:.1f}%)")
        for flag in res["flags"]:
            print(f"warning: {flag}")
        if out:
            write_owned_json(out, res, COMMAND)
            print(f"results: {out}")
        else:
            print(json.dumps({k: v for k, v in res.items() if k != "per_image"}))
        return 0

    return run_cli(_run, (*known_errors(), TimeoutError))  # TimeoutError: stalled decoding


if __name__ == "__main__":
    sys.exit(main())
