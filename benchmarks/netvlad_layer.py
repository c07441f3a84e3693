"""NetVLAD layer benchmark (docs/design.md §2, §7): forward+backward time and peak memory of our two-matmul
`netvlad.pooling.NetVLAD` against two references that compute the same function:

* loop — one (N, 1, D, HW) residual per cluster, weighted and summed inside a Python loop over the K
  clusters (the structure of the popular PyTorch port);
* broadcast — one (N, K, D, HW) residual tensor, weighted by the assignment and summed over HW.

The three are first checked to agree (outputs and gradients, float64, small shapes), then timed in
float32. Each (case, implementation) runs in a fresh subprocess so that its peak memory is its own:
on CPU the growth of ``ru_maxrss`` (peak resident set) past the level reached once the inputs exist,
on CUDA ``torch.cuda.max_memory_allocated`` past the memory allocated once the inputs exist.

Usage: ``python benchmarks/netvlad_layer.py [--device cpu|cuda] [--case big|small|all] [--repeats 5]
[--max-gb 8]``; the broadcast reference runs only where its estimated peak fits ``--max-gb``.
Exit status 0 whether or not the targets (≥ 8× faster than the loop, ≤ ¼ of its peak memory) hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from netvlad.pooling import NetVLAD

#: Targets of the issue, for the loop reference: time(loop)/time(ours) and peak(loop)/peak(ours).
TARGET_SPEEDUP = 8.0
TARGET_MEMORY_RATIO = 4.0
#: Assignment sharpness used for the benchmark layer (any value: it does not change the work done).
ALPHA = 30.0
#: Peak of the broadcast reference in units of its (N, K, D, HW) residual: the residual saved for
#: backward, the gradient w.r.t. it, and the product reduced into the gradient w.r.t. the assignment.
BROADCAST_RESIDUALS_AT_PEAK = 3
GB = 1e9
MB = 1e6


@dataclass(frozen=True)
class Case:
    """A layer configuration: batch N, clusters K, channels D, feature map H×W."""

    batch: int
    clusters: int
    dim: int
    height: int
    width: int

    @property
    def locations(self) -> int:
        return self.height * self.width

    def residual_bytes(self, itemsize: int = 4) -> int:
        """Bytes of one full (N, K, D, HW) residual tensor."""
        return self.batch * self.clusters * self.dim * self.locations * itemsize

    def __str__(self) -> str:
        return f"B={self.batch} K={self.clusters} D={self.dim} {self.height}x{self.width}"


CASES = {
    "big": Case(batch=32, clusters=64, dim=512, height=30, width=40),  # the case
    "small": Case(batch=8, clusters=64, dim=256, height=15, width=20),  # CPU-sized
}
CHECK_CASE = Case(batch=2, clusters=8, dim=32, height=5, width=6)


def _soft_assignment(layer: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) → (N, K, HW) softmax over all K+G clusters of the 1×1 conv, ghosts dropped."""
    logits = F.conv2d(x, layer.conv.weight, layer.conv.bias).flatten(2)
    return logits.softmax(dim=1)[:, : layer.num_clusters]


def _normalise(vlad: torch.Tensor) -> torch.Tensor:
    """(N, K, D) → (N, K·D): intra-normalisation per cluster row, then global L2."""
    return F.normalize(F.normalize(vlad, p=2, dim=2).flatten(1), p=2, dim=1)


def loop_reference(layer: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) → (N, K·D), one cluster at a time through an (N, 1, D, HW) residual."""
    n, d, hw = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    assignment = _soft_assignment(layer, x)  # (N, K, HW)
    features = x.flatten(2)  # (N, D, HW)
    vlad = x.new_zeros(n, layer.num_clusters, d)
    for k in range(layer.num_clusters):
        centre = layer.centroids[k : k + 1, :, None].expand(-1, -1, hw).unsqueeze(0)  # (1, 1, D, HW)
        residual = features.unsqueeze(1) - centre  # (N, 1, D, HW)
        residual *= assignment[:, k : k + 1, None, :]  # a_k(x_i) (x_i − c_k)
        vlad[:, k : k + 1, :] = residual.sum(dim=-1)
    return _normalise(vlad)


def broadcast_reference(layer: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) → (N, K·D) through the full (N, K, D, HW) residual tensor."""
    assignment = _soft_assignment(layer, x)  # (N, K, HW)
    residual = x.flatten(2)[:, None] - layer.centroids[None, :, :, None]  # (N, K, D, HW)
    return _normalise((residual * assignment[:, :, None, :]).sum(dim=-1))


IMPLEMENTATIONS = {
    "ours": lambda layer, x: layer(x),
    "loop": loop_reference,
    "broadcast": broadcast_reference,
}


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0):
    """A NetVLAD layer with unit-norm centres (conv tied to them with ALPHA), unit-norm local features
    x (N, D, H, W) requiring grad, and an upstream gradient (N, K·D) for the backward pass.

    Tensors are filled in place so no large temporary raises the memory baseline.
    """
    generator = torch.Generator().manual_seed(seed)
    layer = NetVLAD(case.clusters, case.dim)
    centres = F.normalize(torch.randn(case.clusters, case.dim, generator=generator), dim=1)
    layer.set_centroids(centres, ALPHA)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(case.batch, case.dim, case.height, case.width, generator=generator, dtype=dtype).to(device)
    x.div_(x.norm(dim=1, keepdim=True)).requires_grad_(True)
    upstream = torch.randn(case.batch, case.clusters * case.dim, generator=generator, dtype=dtype).to(device)
    return layer, x, upstream


def _forward_backward(implementation, layer: NetVLAD, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    output = implementation(layer, x)
    output.backward(upstream)
    return output


def check_agreement(device: str) -> float:
    """Assert that the three implementations agree in float64 on CHECK_CASE: outputs, the gradient
    w.r.t. x, and the gradients w.r.t. centroids and conv (centroids detuned from the conv so that a
    mix-up between them shows). Returns the largest absolute difference seen."""
    layer, x, upstream = make_inputs(CHECK_CASE, device, torch.float64, seed=1)
    with torch.no_grad():
        layer.centroids.add_(0.1 * torch.randn_like(layer.centroids))

    def run(implementation):
        output = _forward_backward(implementation, layer, x, upstream).detach()
        leaves = (x, layer.centroids, layer.conv.weight, layer.conv.bias)
        return [output] + [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]

    expected = run(IMPLEMENTATIONS["ours"])
    worst = 0.0
    for name in ("loop", "broadcast"):
        for label, got, want in zip(("output", "grad x", "grad centroids", "grad conv.weight", "grad conv.bias"),
                                    run(IMPLEMENTATIONS[name]), expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name} {label}: {m}")
            worst = max(worst, (got - want).abs().max().item())
    return worst


def measure(case: Case, implementation: str, device: str, warmup: int, repeats: int, budget_s: float) -> dict:
    """Run in a worker process: median fwd+bwd seconds over up to `repeats` timed passes (after
    `warmup`; no further pass once the timed ones add up to `budget_s`), the number of timed passes,
    and peak bytes above the baseline reached once the inputs exist."""
    fn = IMPLEMENTATIONS[implementation]
    cuda = device == "cuda"
    # Touch every code path on a tiny input first, so library pages loaded lazily are not counted.
    tiny = Case(batch=1, clusters=case.clusters, dim=case.dim, height=2, width=2)
    _forward_backward(fn, *make_inputs(tiny, device, torch.float32))
    layer, x, upstream = make_inputs(case, device, torch.float32)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for step in range(warmup + repeats):
        start = time.perf_counter()
        _forward_backward(fn, layer, x, upstream)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            if sum(times) >= budget_s:
                break
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "passes": len(times), "peak_bytes": peak - baseline}


def _worker_environment() -> dict[str, str]:
    """This process's environment, with OpenMP threads sleeping rather than spinning while idle unless
    the user chose otherwise: on a shared CPU, spinning threads steal the cores that do the work and
    made short kernels here 20x slower."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def run_worker(case_name: str, implementation: str, args: argparse.Namespace) -> dict:
    """Measure one (case, implementation) in a fresh Python process; {"error": ...} if it failed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", implementation, "--case", case_name,
               "--device", args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--budget-s", str(args.budget_s)]
    done = subprocess.run(command, capture_output=True, text=True, env=_worker_environment())
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        return {"error": f"failed ({reason})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def broadcast_need_bytes(case: Case) -> int:
    return BROADCAST_RESIDUALS_AT_PEAK * case.residual_bytes()


def _ratio(reference: dict, ours: dict, key: str) -> float | None:
    if "error" in reference or "skipped" in reference or "error" in ours:
        return None
    return reference[key] / ours[key]


def benchmark_case(case_name: str, args: argparse.Namespace) -> tuple[list[str], bool]:
    """Table rows and target lines for one case; the flag says whether a worker failed."""
    case = CASES[case_name]
    need = broadcast_need_bytes(case)
    results = {}
    for name in IMPLEMENTATIONS:
        if name == "broadcast" and need > args.max_gb * GB:
            results[name] = {"skipped": f"skipped (needs {need / GB:.1f} GB > --max-gb {args.max_gb:g})"}
        else:
            results[name] = run_worker(case_name, name, args)
    ours = results["ours"]
    rows = []
    for name, result in results.items():
        head = f"{case_name:<6} {str(case):<26} {name:<10}"
        if "seconds" not in result:
            rows.append(f"{head} {result.get('skipped') or result['error']}")
            continue
        ratios = [_ratio(result, ours, key) for key in ("seconds", "peak_bytes")]
        rows.append(f"{head} {result['seconds'] * 1e3:>10.1f} {result['passes']:>3} {result['peak_bytes'] / MB:>10.1f} "
                    + " ".join("         -" if r is None else f"{r:>9.1f}x" for r in ratios))
    lines = []
    for name in ("loop", "broadcast"):
        speedup = _ratio(results[name], ours, "seconds")
        saving = _ratio(results[name], ours, "peak_bytes")
        if speedup is None:
            why = results[name].get("skipped") or results[name].get("error") or ours["error"]
            lines.append(f"{case_name}: {name}/ours: not measured, {why}")
            continue
        line = f"{case_name}: {name}/ours time {speedup:.1f}x, peak memory {saving:.1f}x"
        if name == "loop":
            line += (f"  -> target >= {TARGET_SPEEDUP:g}x faster: {'HOLDS' if speedup >= TARGET_SPEEDUP else 'MISSED'}"
                     f", target <= 1/{TARGET_MEMORY_RATIO:g} of its peak memory: "
                     f"{'HOLDS' if saving >= TARGET_MEMORY_RATIO else 'MISSED'}")
        lines.append(line)
    failed = any("error" in result for result in results.values())
    return rows + [""] + lines, failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--case", choices=("big", "small", "all"), default="all",
                        help="big: B=32 K=64 D=512 30x40 (the issue's); small: B=8 K=64 D=256 15x20")
    parser.add_argument("--repeats", type=int, default=5, help="timed fwd+bwd passes at most (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd passes first")
    parser.add_argument("--budget-s", type=float, default=15.0,
                        help="no further timed pass of an implementation once its timed passes add up to "
                             "this many seconds (at least one is always made)")
    parser.add_argument("--max-gb", type=float, default=8.0,
                        help="run the broadcast reference only if its estimated peak "
                             f"({BROADCAST_RESIDUALS_AT_PEAK} x the N*K*D*HW float32 residual) fits in this many GB")
    parser.add_argument("--worker", choices=tuple(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.budget_s <= 0:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --budget-s > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.worker and args.case == "all":
        parser.error("--worker needs a single --case")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(CASES[args.case], args.worker, args.device, args.warmup, args.repeats, args.budget_s)))
        return 0
    started = time.perf_counter()
    worst = check_agreement(args.device)
    where = (f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda"
             else f"cpu ({torch.get_num_threads()} threads)")
    method = ("torch.cuda.max_memory_allocated minus memory allocated once inputs exist" if args.device == "cuda"
              else "ru_maxrss (peak RSS) growth past its level once inputs exist, code paths pre-warmed on a tiny input")
    print(f"NetVLAD layer forward+backward, float32, torch {torch.__version__}, {where}, "
          f"OMP_WAIT_POLICY={_worker_environment()['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"time: median of the timed passes (n; at most {args.repeats}, fewer once they take {args.budget_s:g} s) "
          f"after {args.warmup} warm-up; "
          f"peak memory: each implementation in a fresh subprocess, {method}")
    print(f"agreement check (float64, {CHECK_CASE}): loop and broadcast match ours in output and gradients "
          f"w.r.t. x, centroids, conv (max abs diff {worst:.1e})")
    print()
    print(f"{'case':<6} {'shape':<26} {'impl':<10} {'time ms':>10} {'n':>3} {'peak MB':>10} {'time/ours':>10} {'mem/ours':>10}")
    failed = False
    for case_name in (("big", "small") if args.case == "all" else (args.case,)):
        lines, case_failed = benchmark_case(case_name, args)
        failed |= case_failed
        print("\n".join(lines))
        print()
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
