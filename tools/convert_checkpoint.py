#!/usr/bin/env python
"""Convert Wan2.1 transformers between diffusers folders and Megatron-Core distributed checkpoints.

  python tools/convert_checkpoint.py import --hf DIR --out DIR [--verify]
  python tools/convert_checkpoint.py export --ckpt DIR --out DIR [--verify] [--max-shard-gb N] [--adapter-out DIR]
                                           [--pipeline-from WAN_DIR [--link]]

export writes a WanTransformer3DModel folder; with --pipeline-from WAN_DIR (the diffusers Wan2.1 pipeline
folder the checkpoint was trained from) it writes a whole pipeline instead: OUT/transformer is ours, the
VAE, text encoder, tokenizer, scheduler (image encoder and processor for I2V) and model_index.json are
WAN_DIR's, copied, or symlinked with --link. WanPipeline / WanImageToVideoPipeline.from_pretrained(OUT)
loads it. WAN_DIR is refused, before anything is written, when its pipeline class does not match the
checkpoint (T2V / I2V) or its transformer config differs from the checkpoint's architecture.

A LoRA checkpoint (model.json has a "lora" entry) exports with its adapters merged; --adapter-out also writes
the adapter alone as DIR/pytorch_lora_weights.safetensors (PEFT format), which diffusers loads through
pipe.load_lora_weights(DIR) and transformer.load_lora_adapter(DIR or DIR/pytorch_lora_weights.safetensors).

--verify runs both models on the same random input (fp32) and exits 1 when the relative error of the
output exceeds --tol (default 1e-5).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_regdpo.training.startup import hide_known_warnings  # imports no torch


def main(argv=None) -> int:
    hide_known_warnings()  # before megatron-core is imported: it warns on import
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="diffusers folder -> Megatron distributed checkpoint")
    imp.add_argument("--hf", required=True)
    exp = sub.add_parser("export", help="Megatron distributed checkpoint -> diffusers folder")
    exp.add_argument("--ckpt", required=True)
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    exp.add_argument("--adapter-out", default=None, help="also write the LoRA adapter alone (PEFT format) here")
    exp.add_argument("--pipeline-from", metavar="WAN_DIR", default=None,
                     help="write a whole diffusers pipeline: this base pipeline folder with our transformer")
    exp.add_argument("--link", action="store_true",
                     help="with --pipeline-from: symlink the base's other components instead of copying them")
    for p in (imp, exp):
        p.add_argument("--out", required=True)
        p.add_argument("--verify", action="store_true")
        p.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)

    from megatron_regdpo.models.wan import convert
    from megatron_regdpo.parallel.groups import distributed_session

    with distributed_session(world_size=1) as pg:
        return _run(args, convert, pg)


def _run(args, convert, pg) -> int:
    try:
        if args.cmd == "import":
            arch = convert.import_diffusers(args.hf, args.out, pg)
            print(f"imported {args.hf} -> {args.out} ({arch.task}, {arch.num_layers} layers, hidden {arch.hidden})")
            hf_dir, ckpt_dir = args.hf, args.out
        else:
            hf_dir, ckpt_dir = _export(args, convert, pg), args.ckpt
        if args.verify:
            diff = convert.verify(hf_dir, ckpt_dir, pg)
            ok = diff["max_rel"] <= args.tol
            print(f"verify: max abs diff {diff['max_abs']:.3e}, max rel diff {diff['max_rel']:.3e} "
                  f"(tol {args.tol:g}) -> {'OK' if ok else 'FAIL'}")
            return 0 if ok else 1
        return 0
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _export(args, convert, pg) -> Path:
    """Write the export; returns the transformer folder that --verify checks."""
    if args.link and not args.pipeline_from:
        raise ValueError("--link: only with --pipeline-from (it links the base pipeline's components)")
    if args.adapter_out:  # refused before anything is written
        from megatron_regdpo.checkpoint_io.megatron_ckpt import read_meta
        from megatron_regdpo.models.wan.lora_export import ADAPTER_FILE

        if not read_meta(args.ckpt).get("lora"):
            raise ValueError(f"--adapter-out: {args.ckpt} is a full fine-tune (its model.json records no "
                             f"LoRA adapters); export it without --adapter-out")
        if (Path(args.adapter_out) / ADAPTER_FILE).exists():
            raise FileExistsError(f"--adapter-out: {Path(args.adapter_out) / ADAPTER_FILE} exists; "
                                  f"refusing to overwrite it")
    shard_bytes = int(args.max_shard_gb * 2**30)
    if args.pipeline_from:  # every refusal comes before anything is written
        from megatron_regdpo.models.wan.pipeline_export import export_pipeline

        how = export_pipeline(args.ckpt, args.pipeline_from, args.out, pg, args.link, shard_bytes)
        print(f"exported {args.ckpt} -> {args.out} (pipeline from {args.pipeline_from}: "
              + ", ".join(f"{name} {h}" for name, h in how.items()) + ")")
        hf_dir = Path(args.out) / "transformer"
    else:
        paths = convert.export_diffusers(args.ckpt, args.out, pg, shard_bytes)
        print(f"exported {args.ckpt} -> {args.out} ({len(paths)} safetensors file(s))")
        hf_dir = Path(args.out)
    if args.adapter_out:
        from megatron_regdpo.models.wan.lora_export import write_peft_adapter

        model, arch = convert.load_checkpoint(args.ckpt, pg)
        print(f"wrote the LoRA adapter to {write_peft_adapter(model, arch, args.adapter_out)}")
    return hf_dir


if __name__ == "__main__":
    sys.exit(main())
