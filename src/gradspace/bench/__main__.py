"""``python -m gradspace.bench {update,step,memory,distributed,adarank}``: side-by-side benchmarks, markdown tables."""

from __future__ import annotations

import argparse

import torch

from .timing import machine


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradspace.bench", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="bench", required=True)
    upd = sub.add_parser("update", help="cost of one subspace update per tracker vs torch.linalg.svd")
    upd.add_argument("--shape", default="2048x5461", help="weight shape, e.g. 2048x5461")
    upd.add_argument("--preset", default=None, help="every projected shape of a LLaMA preset instead of --shape")
    upd.add_argument("--rank", type=int, default=None, help="default: 512, or the papers' rank for --preset")
    upd.add_argument("--repeats", type=int, default=3)
    upd.add_argument("--device", default="cpu")
    upd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    upd.add_argument("--trackers", default=None, help="comma-separated tracker names (default: all)")
    stp = sub.add_parser("step", help="optimizer.step() time on a LLaMA parameter set vs AdamW and galore-torch")
    stp.add_argument("--preset", default="60m")
    stp.add_argument("--rank", type=int, default=None, help="default: the papers' rank for the preset")
    stp.add_argument("--methods", default=None, help="comma-separated gradspace presets (default: all)")
    stp.add_argument("--repeats", type=int, default=5)
    stp.add_argument("--device", default="cpu")
    stp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    stp.add_argument("--layers", type=int, default=None, help="build the preset with this many blocks")
    stp.add_argument("--no-references", action="store_true", help="leave out torch AdamW and galore-torch")
    stp.add_argument(
        "--stagger", action="store_true", help="instead: the largest single step with update_stagger + randomized SVD"
    )
    rsv = sub.add_parser("svd", help="randomized vs exact SVD on real gradients: captured energy and time")
    rsv.add_argument("--preset", default="1b")
    rsv.add_argument("--rank", type=int, default=None, help="default: hidden/4")
    rsv.add_argument("--layers", type=int, default=1, help="blocks of the preset to build (their shapes are real)")
    rsv.add_argument("--steps", type=int, default=5, help="AdamW steps before the gradient is taken")
    bud = sub.add_parser("budget", help="memory budget of a model too large to run: counted weights and state")
    bud.add_argument("--preset", default="7b")
    bud.add_argument("--rank", type=int, default=1024)
    bud.add_argument("--transient-1b-gib", type=float, default=None, help="measured 1B activations + transients")
    dst = sub.add_parser("distributed", help="subspace updates sharded over 2 gloo ranks vs replicated vs 1 process")
    dst.add_argument("--tracker", default="svd")
    dst.add_argument("--steps", type=int, default=3)
    dst.add_argument("--memory", action="store_true", help="instead: per-rank memory of DDP, layer-wise DDP, FSDP2")
    dst.add_argument("--preset", default="60m", help="with --memory: the LLaMA preset")
    ada = sub.add_parser("adarank", help="AdaRankGrad: refresh-criterion sweep, or --variants: rank rules vs GaLore")
    ada.add_argument("--steps", type=int, default=300)
    ada.add_argument(
        "--variants",
        action="store_true",
        help="instead: rank rules (criterion, basis, r_min, eta_th) vs GaLore over several seeds",
    )
    ada.add_argument("--seeds", type=int, default=3, help="with --variants")
    ada.add_argument("--only", default=None, help="with --variants: comma-separated label substrings")
    mem = sub.add_parser("memory", help="optimizer-state bytes (counted vs formula vs papers) and peak step memory")
    mem.add_argument("--configs", default="60m,130m,350m,1b", help="LLaMA presets for the state-bytes tables")
    mem.add_argument("--vocab", type=int, default=32000)
    mem.add_argument(
        "--check-preset", default="mini", help="preset on which meta counts must equal real ones ('' skips)"
    )
    mem.add_argument("--adarank-preset", default="60m", help="preset for AdaRankGrad's effective rank ('' skips)")
    mem.add_argument("--adarank-steps", type=int, default=30)
    mem.add_argument("--peak-preset", default="60m", help="preset for the peak-memory table ('' skips)")
    mem.add_argument("--peak-rank", type=int, default=None, help="default: hidden/4")
    mem.add_argument("--peak-steps", type=int, default=3)
    mem.add_argument("--peak-methods", default=None, help="comma-separated variant labels (default: all but 8-bit)")
    mem.add_argument("--seq-len", type=int, default=128)
    mem.add_argument("--batch-size", type=int, default=1)
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--jobs", type=int, default=1, help="peak-memory subprocesses run at a time")
    mem.add_argument("--out", default="runs/bench-memory")
    mem.add_argument("--real", action="store_true", help="instead: real training steps at --preset, one process each")
    mem.add_argument("--preset", default="1b", help="with --real")
    mem.add_argument("--real-threads", type=int, default=2, help="with --real: threads of each training process")
    mem.add_argument("--only", default=None, help="with --real: comma-separated configuration labels")
    mem.add_argument("--real-steps", type=int, default=2, help="with --real: training steps per configuration")
    mem.add_argument("--real-seq-len", type=int, default=256, help="with --real: tokens of the batch of 1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    if args.bench == "update":
        from . import update

        trackers = args.trackers.split(",") if args.trackers else None
        dtype = getattr(torch, args.dtype)
        if args.preset:
            print(update.run_preset(args.preset, args.rank, args.repeats, args.device, dtype, trackers))
        else:
            shape = tuple(int(x) for x in args.shape.lower().split("x"))
            print(update.run(shape, args.rank or 512, args.repeats, args.device, dtype, trackers))
    elif args.bench == "step" and args.stagger:
        from . import step

        print(step.stagger(args.preset, args.rank, args.layers, args.device))

    elif args.bench == "step":
        from . import step

        print(
            step.run(
                args.preset,
                args.methods.split(",") if args.methods else None,
                args.rank,
                repeats=args.repeats,
                device=args.device,
                dtype=getattr(torch, args.dtype),
                layers=args.layers,
                references=not args.no_references,
            )
        )

    elif args.bench == "svd":
        from . import svd

        print(svd.run(args.preset, args.rank, args.layers, args.steps))

    elif args.bench == "budget":
        from . import budget

        extra = None if args.transient_1b_gib is None else args.transient_1b_gib * 2**30
        print(budget.run(args.preset, args.rank, extra))

    elif args.bench == "distributed":
        if args.memory:
            from . import distributed_memory

            print(distributed_memory.run(args.preset))
        else:
            from . import sharded_updates

            print(sharded_updates.run(args.tracker, args.steps))

    elif args.bench == "adarank":
        from . import adarank_sweep

        if args.variants:
            print(adarank_sweep.run_variants(args.steps, args.seeds, only=args.only))
        else:
            print(adarank_sweep.run(args.steps))

    elif args.bench == "memory" and args.real:
        from . import real_memory

        only = args.only.split(",") if args.only else None
        print(
            real_memory.run(
                args.preset,
                args.peak_rank,
                max(2, args.peak_steps - 1),
                args.seq_len * 2,
                args.real_threads,
                args.device,
                only,
                args.vocab,
            )
        )

    elif args.bench == "memory":
        from . import memory

        print(
            memory.run(
                args.configs.split(","),
                args.out,
                args.vocab,
                args.check_preset or None,
                args.adarank_preset or None,
                args.adarank_steps,
                args.peak_preset or None,
                args.peak_rank,
                args.peak_steps,
                args.seq_len,
                args.batch_size,
                args.device,
                args.peak_methods.split(",") if args.peak_methods else None,
                args.jobs,
            )
        )


if __name__ == "__main__":
    main()
