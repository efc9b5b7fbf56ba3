#!/usr/bin/env python
"""Convert Wan2.1 transformers between diffusers folders and Megatron-Core distributed checkpoints.

  python tools/convert_checkpoint.py import --hf DIR --out DIR [--verify]
  python tools/convert_checkpoint.py export --ckpt DIR --out DIR [--verify] [--max-shard-gb N] [--adapter-out DIR]

A LoRA checkpoint (model.json has a "lora" entry) exports with its adapters merged; --adapter-out also writes
the adapter alone as DIR/pytorch_lora_weights.safetensors, the PEFT format diffusers' load_lora_weights reads.

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
            if args.adapter_out:  # refused before anything is written
                from megatron_regdpo.checkpoint_io.megatron_ckpt import read_meta
                from megatron_regdpo.models.wan.lora_export import ADAPTER_FILE

                if not read_meta(args.ckpt).get("lora"):
                    raise ValueError(f"--adapter-out: {args.ckpt} is a full fine-tune (its model.json records no "
                                     f"LoRA adapters); export it without --adapter-out")
                if (Path(args.adapter_out) / ADAPTER_FILE).exists():
                    raise FileExistsError(f"--adapter-out: {Path(args.adapter_out) / ADAPTER_FILE} exists; "
                                          f"refusing to overwrite it")
            paths = convert.export_diffusers(args.ckpt, args.out, pg, int(args.max_shard_gb * 2**30))
            print(f"exported {args.ckpt} -> {args.out} ({len(paths)} safetensors file(s))")
            if args.adapter_out:
                from megatron_regdpo.models.wan.lora_export import write_peft_adapter

                model, arch = convert.load_checkpoint(args.ckpt, pg)
                print(f"wrote the LoRA adapter to {write_peft_adapter(model, arch, args.adapter_out)}")
            hf_dir, ckpt_dir = args.out, args.ckpt
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


if __name__ == "__main__":
    sys.exit(main())
