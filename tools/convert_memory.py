"""Time and peak memory of checkpoint conversion on a synthetic 7B-shaped fp16 Meta checkpoint.

    python tools/convert_memory.py --workdir /tmp/convert7b            # 7B shapes, ~13.5 GB/copy
    python tools/convert_memory.py --workdir /tmp/c --layers 4         # same widths, 4 layers

Writes ``<workdir>/meta`` (params.json + consolidated.00.pth, random fp16 weights, streamed
tensor by tensor), then runs each conversion as its own `megatron-llama convert` process
and reports its wall time and peak resident memory (the child's ``ru_maxrss``, which counts
memory-mapped file pages it touched as well as its own allocations):

    meta -> megatron (TP=1 PP=1 dist checkpoint)    megatron -> meta (1 shard, compared
    bit for bit with the input)    meta -> hf (safetensors)    meta -> meta (2 shards)

Outputs are deleted after each step except ``megatron`` (input of the next one), so the disk
needs about three copies (~41 GB for 7B). ``--keep`` keeps everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch


def make_synthetic_meta(directory: str, layers: int | None) -> None:
    """A Meta directory with the 7B preset's shapes (optionally fewer layers), fp16.

    Built under ``<directory>.tmp`` and renamed when complete, so an interrupted run never
    leaves a truncated checkpoint that the next run would take as its input."""
    from tqdm import tqdm

    from megatron_llama.convert.tensorio import TorchFileWriter
    from megatron_llama.model.canonical import full_shape, meta_keys
    from megatron_llama.model.presets import get_preset

    cfg = get_preset("7B").model
    if layers:
        cfg = type(cfg)(**{**cfg.__dict__, "n_layers": layers})
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    keys = meta_keys(cfg)
    writer = TorchFileWriter(os.path.join(tmp, "consolidated.00.pth"),
                             [(k, full_shape(k, cfg), torch.float16) for k in keys])
    g = torch.Generator().manual_seed(0)
    for key in tqdm(keys, desc="synthetic 7B-shaped checkpoint", unit=" tensors"):
        shape = full_shape(key, cfg)
        t = torch.randn(shape, generator=g) * 0.02
        if key.endswith("norm.weight"):
            t += 1.0
        writer.write(key, t.half())
    writer.close()
    cfg.to_params_json(os.path.join(tmp, "params.json"))
    os.replace(tmp, directory)


def run_measured(argv: list[str]) -> tuple[float, float]:
    """Run a command; return (seconds, peak RSS in GiB of that process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}")
    return seconds, usage.ru_maxrss / 2**20  # KiB -> GiB


def same_weights(a: str, b: str) -> bool:
    """Bit-equality of two 1-shard Meta directories, tensor by tensor (memory-mapped)."""
    from megatron_llama.convert.meta import MetaCheckpoint

    x, y = MetaCheckpoint(a), MetaCheckpoint(b)
    from megatron_llama.model.canonical import meta_keys

    return all(torch.equal(x.tensor(k), y.tensor(k)) for k in meta_keys(x.config))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="directory for the checkpoints")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the number of layers (default: 7B's 32)")
    parser.add_argument("--keep", action="store_true", help="keep every output")
    args = parser.parse_args()
    meta = os.path.join(args.workdir, "meta")
    if not os.path.isdir(meta):
        start = time.perf_counter()
        make_synthetic_meta(meta, args.layers)
        print(f"synthetic checkpoint: {time.perf_counter() - start:.0f} s, "
              f"{os.path.getsize(os.path.join(meta, 'consolidated.00.pth')) / 2**30:.2f} GiB")
    cli = [sys.executable, "-m", "megatron_llama.cli", "convert", "--force", "--no-progress"]
    steps = [("meta -> megatron", meta, "megatron", ["--to", "megatron"]),
             ("megatron -> meta", "megatron", "back", ["--to", "meta", "--shards", "1"]),
             ("meta -> hf", meta, "hf", ["--to", "hf"]),
             ("meta -> meta x2", meta, "meta2", ["--to", "meta", "--shards", "2"])]
    rows = []
    for label, src, out, flags in steps:
        src = src if os.path.isabs(src) else os.path.join(args.workdir, src)
        out = os.path.join(args.workdir, out)
        seconds, peak = run_measured(cli + ["--input", src, "--output", out] + flags)
        note = ""
        if out.endswith("back"):
            note = "bit-exact" if same_weights(meta, out) else "DIFFERENT"
        rows.append((label, seconds, peak, note))
        print(f"{label:<18} {seconds:7.1f} s   peak RSS {peak:5.2f} GiB  {note}", flush=True)
        if not args.keep and not out.endswith("megatron"):
            shutil.rmtree(out)
    size = os.path.getsize(os.path.join(meta, "consolidated.00.pth")) / 2**30
    print(f"\ncheckpoint {size:.2f} GiB; largest peak RSS {max(r[2] for r in rows):.2f} GiB")
    if not args.keep:
        shutil.rmtree(os.path.join(args.workdir, "megatron"))
    return 0 if all(r[3] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
