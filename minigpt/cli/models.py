"""Commands that read or write a model: `minigpt quantize`, `eval`, `import`, `export`, `init`."""

import sys
from pathlib import Path

from minigpt.cli.common import Parser
from minigpt.cli.generation import apply_int8, int8_arguments
from minigpt.errors import ConfigError, DataError
from minigpt.nn import quant


def cmd_quantize(argv) -> int:
    import minigpt
    from minigpt.train import checkpoint

    p = Parser(prog="minigpt quantize",
               description="Write a quantized checkpoint of a trained run: every linear layer's weights and "
               "the (tied) token table in int8 with one float32 scale per output channel (--mode), or "
               "packed at --bits 16, 8 or 4 for the compiled kernels.",
               epilog="example: minigpt quantize out/tiny -o out/tiny-q4 --bits 4 && "
               "python generate.py out/tiny-q4 --prompt 'def '")
    p.add_argument("run", help="a run folder or checkpoint file")
    p.add_argument("-o", "--output", required=True, help="a folder (gets ckpt.npz) or a .npz file")
    p.add_argument("--bits", type=int, choices=(16, 8, 4), default=None,
                   help="packed weight-only weights instead of an --int8 mode: 16 (fp16 or bf16), 8 "
                   "(per-channel scales) or 4 (a scale per --group-size inputs); every linear layer "
                   "and the LM head, read by the compiled kernels")
    p.add_argument("--group-size", type=int, default=32, help="--bits 4: inputs sharing one scale (default 32)")
    p.add_argument("--storage16", choices=("fp16", "bf16"), default="fp16", help="--bits 16: the format")
    p.add_argument("--mode", choices=quant.MODES, default=quant.DEFAULT_MODE,
                   help=f"inference mode stored without --bits (default {quant.DEFAULT_MODE})")
    p.add_argument("--int8-embedding", action="store_true", help="read the token embedding from int8 too")
    p.add_argument("--kv-int8", action="store_true", help="keep the KV cache in int8 when generating")
    p.add_argument("--outlier-threshold", type=float, default=None, help="w8a8 outlier threshold")
    args = p.parse_args(argv)
    quant.check_outlier_threshold(args.outlier_threshold, "--outlier-threshold")
    path = Path(args.output)
    if path.suffix != ".npz":
        path = path / checkpoint.FILENAME
    source = checkpoint.resolve(args.run)
    if path.exists() and source.exists() and path.resolve() == source.resolve():
        raise ConfigError(f"quantize: -o {path} is the checkpoint being quantized; it would replace "
                          "the fp32 weights and optimizer state (give another folder)")
    model = minigpt.load(args.run)
    if model.gpt.quant is not None:
        raise ConfigError(f"{args.run}: already an int8 checkpoint")
    if args.bits is not None:
        if args.int8_embedding or args.outlier_threshold is not None:
            raise ConfigError("--int8-embedding and --outlier-threshold belong to --mode, not --bits")
        model.quantize(kv_int8=args.kv_int8, bits=args.bits, group_size=args.group_size,
                       storage16=args.storage16)
    else:
        model.quantize(args.mode, args.int8_embedding, args.kv_int8, args.outlier_threshold)
    model.save_int8(path)
    from minigpt.evaluate import weight_bytes

    fp32 = model.gpt.params.data.nbytes
    print(f"wrote {path}: {model.gpt.quant.qcfg.name}, weights {weight_bytes(model.gpt):,} bytes (fp32: {fp32:,})")
    return 0


def cmd_eval(argv) -> int:
    import json

    import minigpt
    from minigpt.evaluate import evaluate

    p = Parser(prog="minigpt eval",
               description="Validation loss and perplexity of a run; with --bits or --int8, the quantized model "
               "against fp32: relative loss change, KL divergence of the next-token distributions, "
               "top-1 agreement, weight bytes and bytes moved per generated token.",
               epilog="example: minigpt eval out/tiny --bits 4 --format json")
    p.add_argument("run", help="a run folder or checkpoint file")
    int8_arguments(p)
    p.add_argument("--max-tokens", type=int, default=1 << 17, help="validation tokens to use (default 131072)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model = minigpt.load(args.run)
    if model.tokenizer.kind == "none":
        raise DataError(f"{args.run}: this run has no tokenizer (no vocab.json + merges.txt were given), so "
                        "eval cannot encode its validation text; import the model with its tokenizer files")
    reference = None
    if args.int8 is not None or args.bits != 32:
        if model.gpt.quant is not None:
            raise ConfigError(f"{args.run}: already a quantized checkpoint; evaluate it without "
                              f"{'--int8' if args.int8 is not None else '--bits'}")
        reference = minigpt.load(args.run)
    apply_int8(model, args)
    result = evaluate(model, reference, args.max_tokens)
    q = model.gpt.quant
    mode = q.qcfg.name if q is not None else "fp32"
    bits = 32 if q is None else (8 if q.qcfg.bits is None else q.qcfg.bits)
    result = {"run": str(args.run), "mode": mode, "bits": bits} | result
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            shown = f"{v:.6g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
            print(f"{k:<16} {shown}")
    return 0


def cmd_import(argv) -> int:
    from minigpt import interop

    p = Parser(prog="minigpt import",
               description="Turn a Hugging Face GPT-2 folder (config.json + model.safetensors, any of "
               "the four sizes; fp32, fp16 or bf16; vocab.json + merges.txt if present) into a run "
               "folder that generate.py, minigpt costs/eval/quantize and minigpt.load accept. "
               "Pickled pytorch_model.bin files are refused.",
               epilog="example: minigpt import ~/gpt2 out/gpt2 && python generate.py out/gpt2 "
               "--prompt 'Hello' && minigpt costs out/gpt2 --mode decode")
    p.add_argument("hf_dir", help="a folder holding config.json and model.safetensors")
    p.add_argument("run_dir", help="the run folder to write (gets ckpt.npz)")
    args = p.parse_args(argv)
    info = interop.import_hf(args.hf_dir, args.run_dir)
    c = info["config"]
    print(f"imported {info['params']:,} parameters ({', '.join(info['dtypes'])} -> float32): "
          f"{c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, context {c['block_size']}, "
          f"vocab {c['vocab_size']} -> {args.run_dir}")
    if info["tokenizer"] == "none":
        print("note: no vocab.json + merges.txt in the folder: the run has no tokenizer, so text "
              "prompts cannot be encoded (generate --prompt-ids works)", file=sys.stderr)
    return 0


def cmd_export(argv) -> int:
    import minigpt
    from minigpt import interop

    p = Parser(prog="minigpt export",
               description="Write a run as a Hugging Face GPT-2 folder: config.json, model.safetensors "
               "(fp32) and the tokenizer's vocab.json + merges.txt, which "
               "transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) loads.",
               epilog="example: minigpt export out/tiny out/tiny-hf --format hf")
    p.add_argument("run", help="a run folder or checkpoint file")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: Hugging Face GPT-2 (the only one)")
    args = p.parse_args(argv)
    for path in interop.export_hf(minigpt.load(args.run), args.out_dir):
        print(f"wrote {path}")
    return 0


def cmd_init(argv) -> int:
    import numpy as np

    from minigpt import config, interop
    from minigpt.nn.params import init

    p = Parser(prog="minigpt init",
               description="A run folder of GPT-2-initialised weights for a config, no training and no "
               "optimizer state (so a 1558M model needs its 6.2 GB of fp32 parameters, not three "
               "times that): for generate, minigpt costs and bench/decode.py at real size.",
               epilog="example: minigpt init configs/gpt2-124m.toml out/gpt2-124m-random && "
               "python bench/decode.py out/gpt2-124m-random")
    p.add_argument("config", help="a TOML config, e.g. configs/gpt2-124m.toml")
    p.add_argument("run_dir", help="the run folder to write (gets ckpt.npz)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="weights' seed (default: [train] seed)")
    args = p.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    cfg.train.out_dir = args.run_dir
    tokenizer = _init_tokenizer(cfg)
    seed = cfg.train.seed if args.seed is None else args.seed
    params = init(cfg.model, np.random.default_rng(seed), "float32")
    path = interop.write_run(args.run_dir, cfg, params.data, tokenizer, {"initialised_seed": seed})
    print(f"wrote {path}: {params.size:,} parameters, GPT-2 initialisation (seed {seed}), untrained")
    return 0


def _init_tokenizer(cfg):
    """bytes; a BPE from [data] tokenizer_path; with neither, no tokenizer (learning 50,000 merges
    is a training job, not an init)."""
    from minigpt.tokenizers import ByteTokenizer, MissingTokenizer

    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    if not cfg.data.tokenizer_path:
        print("note: [data] tokenizer = \"bpe\" with no tokenizer_path: the run has no tokenizer, so "
              "text prompts cannot be encoded (generate --prompt-ids works)", file=sys.stderr)
        return MissingTokenizer(cfg.model.vocab_size)
    from minigpt.tokenizers.bpe import BPETokenizer

    tok = BPETokenizer.load(Path(cfg.data.tokenizer_path).expanduser())
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"[model] vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}")
    return tok
