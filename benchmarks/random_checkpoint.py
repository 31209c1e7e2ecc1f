"""A checkpoint with random weights of a model's shape and its tokenizer, for server and
decoding benchmarks whose timings do not depend on the weights (``serve_load.py --
--model OUT``). Needs only the small files of ``--like`` (config and tokenizer, 3.5 MB for
the default), so a device call carries them instead of the weights. ``--set`` changes fields
of that config (JSON values): another shape with the same tokenizer.

    python benchmarks/random_checkpoint.py /root/random-smollm2 [--like DIR]
    python benchmarks/random_checkpoint.py /root/random-hd128 --set hidden_size=1024 \
        intermediate_size=3072 num_attention_heads=16 num_key_value_heads=8 head_dim=128 \
        num_hidden_layers=28

``--like``: a Hugging Face model directory (default: the embedded default's converted copy
under ``$TIDAR_CACHE``, written on its first use).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers as tf

from tidar import default_model

SMALL_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", type=Path,
                    default=default_model.cache_dir() / default_model.NAME / "hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                    help="config fields to change, e.g. head_dim=128")
    args = ap.parse_args()
    if not (args.like / "config.json").is_file():
        raise SystemExit(f"random_checkpoint: no config.json in {args.like}")
    config = tf.AutoConfig.from_pretrained(args.like)
    for field in args.set:
        name, _, value = field.partition("=")
        if not hasattr(config, name):
            raise SystemExit(f"random_checkpoint: --set {field}: the config has no {name!r}")
        try:
            setattr(config, name, json.loads(value))
        except json.JSONDecodeError:
            raise SystemExit(f"random_checkpoint: --set {field}: {value!r} is not a JSON "
                             "value") from None
    torch.manual_seed(args.seed)
    tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(args.out)
    for name in SMALL_FILES:
        if (args.like / name).is_file():
            shutil.copy(args.like / name, args.out)
    print(f"random {config.model_type} checkpoint written to {args.out}")


if __name__ == "__main__":
    main()
