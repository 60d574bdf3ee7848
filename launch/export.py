"""Export a trained checkpoint as an inference bundle to share: weights as safetensors, the memory as a pack,
a model card; with --onnx also the generator and extractor as ONNX graphs (serving without torch).

    python launch/export.py --checkpoint runs/x --output model/ [--onnx]      # or: pccnet-export ...
    python launch/colorize.py --checkpoint model/ --input gray/ --output out/  # a bundle is a --checkpoint
    python launch/onnx_colorize.py --model model/ --input gray.jpg --output out/  # numpy + onnxruntime only

The bundle (trainer/bundle.py) holds bundle.json, config.yaml, generator.safetensors,
extractor.safetensors, memory.pack and README.md (training data, steps, the scores of any eval*.json
next to the checkpoint, else "not measured"). Nothing in it is a pickle.
"""

from __future__ import annotations

import argparse
import sys

from launch.common import report_errors, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, a run's out_dir (latest) or a bundle")
    parser.add_argument("--output", required=True, help="folder to write the bundle to")
    parser.add_argument("--onnx", action="store_true", help="also write onnx/extractor.onnx and onnx/generator.onnx "
                        "(needs the `onnx` extra)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    args = parser.parse_args(argv)

    from trainer.bundle import export_bundle

    def run() -> int:
        done = export_bundle(args.checkpoint, args.output, onnx=args.onnx, overwrite=args.overwrite)
        memory = f"memory {done['memory']} slots written" if done["memory"] is not None else "no memory"
        print(f"wrote {done['path']}: step {done['step']}, {memory}, files {', '.join(done['files'])}")
        return 0

    return report_errors(run, user_errors())


if __name__ == "__main__":
    sys.exit(main())
