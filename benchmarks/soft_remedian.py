"""Soft remedian (O(n)) vs soft median (O(n²)): time and time per element as n grows.

Run: .venv/bin/python benchmarks/soft_remedian.py [--rows 4] [--max-n 128000]
Times are medians of torch.utils.benchmark blocked_autorange (float32, CPU threads as set by
torch), for ``rows`` independent rows of n standard-normal values reduced over the last dim.
"per-elem ×" is (time(n)/n) / (time(n0)/n0) for the smallest n0: flat means linear growth
(it first falls while the fixed per-level overhead of small n is amortised).
"|F−½|" is where the remedian lands in the sample's distribution (0 = the exact median).
"""

import argparse

import torch
from torch.utils.benchmark import Timer

from netvlad.soft import softmedian, softremedian


def seconds(stmt: str, **env) -> float:
    return Timer(stmt, globals=env).blocked_autorange(min_run_time=0.2).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="independent rows reduced at once")
    parser.add_argument("--min-n", type=int, default=125)
    parser.add_argument("--max-n", type=int, default=128_000)
    parser.add_argument("--alpha", type=float, default=10.0, help="sharpness, 1/units of x")
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--median-max-n", type=int, default=4000, help="largest n for the O(n²) soft median")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}, "
          f"alpha={args.alpha}, block={args.block}, float32")
    header = (f"{'n':>7} {'remedian fwd':>13} {'µs/elem':>8} {'per-elem ×':>10} {'fwd+bwd':>10} "
              f"{'per-elem ×':>10} {'|F−½|':>6} {'softmedian':>11} {'median/remed':>12}")
    print(header)
    print("-" * len(header))
    base_fwd = base_bwd = None
    n = args.min_n
    while n <= args.max_n:
        x = torch.randn(args.rows, n)
        xg = x.clone().requires_grad_()
        kw = dict(alpha=args.alpha, block=args.block)
        fwd = seconds("softremedian(x, **kw)", softremedian=softremedian, x=x, kw=kw)
        bwd = seconds("softremedian(x, **kw).sum().backward()", softremedian=softremedian, x=xg, kw=kw)
        est = softremedian(x, **kw)
        cdf_err = ((x <= est[:, None]).float().mean(-1) - 0.5).abs().max().item()
        base_fwd = base_fwd or fwd / n
        base_bwd = base_bwd or bwd / n
        line = (f"{n:>7} {fwd * 1e3:>10.2f} ms {fwd / n / args.rows * 1e6:>8.3f} {fwd / n / base_fwd:>10.2f} "
                f"{bwd * 1e3:>7.2f} ms {bwd / n / base_bwd:>10.2f} {cdf_err:>6.3f}")
        if n <= args.median_max_n:
            med = seconds("softmedian(x, alpha=a)", softmedian=softmedian, x=x, a=args.alpha)
            line += f" {med * 1e3:>8.2f} ms {med / fwd:>12.1f}"
        else:
            line += f" {'(skipped)':>11} {'':>12}"
        print(line, flush=True)
        n *= 2


if __name__ == "__main__":
    main()
